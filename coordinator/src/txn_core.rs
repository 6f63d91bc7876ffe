//! The transactional-message protocol of one transaction, without I/O:
//! events in, effects out, the shape of the consumer-group machine in
//! `group.rs`. Time, the partition's high-water mark and a fresh marker come
//! in with the events; nothing here reads a clock, a disk or a socket.
//!
//! It decides identity (a retried prepare is the same transaction only with
//! the same service and content), who may end a transaction and which
//! repeats are harmless, the check-back schedule and its final action, when
//! a finished transaction is forgotten, and what start-up recovery
//! concludes. Three rules keep an outcome from being lost or reversed:
//! - a message is appended only from PREPARED, and the commit is taken only
//!   once the append is reported ([`Event::Appended`]);
//! - ROLLED_BACK is written before it is acknowledged, and a rolled-back
//!   transaction never asks for an append;
//! - after a restart, a PREPARED transaction whose message (recognised by
//!   its marker) is in its partition after its recorded mark is COMMITTED.
//!
//! The shell performs the effects of one event in order while it holds the
//! transaction's lock; the first that fails stops the rest and is reported
//! with [`Event::Failed`], which puts the transaction back as it was before
//! that event. The records the effects carry are the transaction's whole
//! state, so the latest one written rebuilds it ([`TxnState::restore`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tandem_proto::coordinator as pb;
use tandem_storage::{Header, Record, TopicPartition};

use crate::broker::Outgoing;
use crate::config::{FinalAction, TxnSettings};
use crate::error::{Error, Result};
use crate::wire::{headers_from_wire, headers_to_wire};

const PREPARED: i32 = 1;
const COMMITTED: i32 = 3;
const ROLLED_BACK: i32 = 4;

/// The header that marks a transaction's appended message; reserved: a
/// plain publish may not set it, and deliveries do not show it.
pub(crate) const MARKER_HEADER: &str = "tandem.txn";

/// The half message itself.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct HalfRecord {
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
pub(crate) struct TxnRecord {
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
    /// The call that prepared it (`PrepareRequest.attempt`).
    #[prost(string, tag = "16")]
    attempt: String,
}

/// Decodes a transaction's record from the bytes read back from
/// `__txn_state`, copying its key, value, headers and context out of them.
/// Read records share the read buffer (256 KiB at a time); a half message
/// slicing into it would keep the whole buffer alive for as long as the
/// transaction stays open, and a few open transactions among many finished
/// ones would keep most of the log in memory.
pub(crate) fn decode_record(bytes: &[u8]) -> std::result::Result<TxnRecord, prost::DecodeError> {
    <TxnRecord as prost::Message>::decode(bytes)
}

/// Whether a header is the W3C trace context, which says where a message
/// was sent from, not what it says.
pub(crate) fn is_trace_header(name: &str) -> bool {
    name == tandem_runtime::telemetry::TRACEPARENT || name == tandem_runtime::telemetry::TRACESTATE
}

/// Fingerprint of a half message's content, for the identity check of a
/// retried prepare (the id, the timestamp and the trace context are not
/// content).
fn digest(topic: &str, m: &Outgoing) -> u64 {
    let mut parts: Vec<&[u8]> = vec![topic.as_bytes()];
    let partition = m.partition.map(u32::to_le_bytes);
    parts.push(partition.as_ref().map_or(b"-", |p| p.as_slice()));
    let key = m.record.key.as_deref();
    parts.push(if key.is_some() { b"k" } else { b"-" });
    parts.push(key.unwrap_or_default());
    parts.push(&m.record.value);
    // The trace context is not content: a retry sent from another span is
    // the same transaction.
    for h in m
        .record
        .headers
        .iter()
        .filter(|h| !is_trace_header(&h.name))
    {
        parts.push(h.name.as_bytes());
        parts.push(&h.value);
    }
    crate::wire::fingerprint(&parts, 0x9e37_79b9)
}

/// Delay before check-back number `done + 1`: `check_after`, then doubling
/// from there, at most `max_interval`.
pub(crate) fn check_delay(s: &TxnSettings, done: u32) -> Duration {
    let factor = 1u32.checked_shl(done.min(20)).unwrap_or(u32::MAX);
    s.check_after
        .saturating_mul(factor)
        .min(s.max_check_interval.max(s.check_after))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// How start-up recovery recognises a prepared transaction's message.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Sought {
    /// By its marker header (every transaction prepared by this version).
    Marker(String),
    /// By its id alone (prepared before messages were marked).
    Id(String),
}

impl Sought {
    /// Every key a stored message can be recognised by.
    pub(crate) fn keys(record: &Record) -> impl Iterator<Item = Sought> {
        let marker = record
            .headers
            .iter()
            .find(|h| h.name == MARKER_HEADER)
            .map(|h| Sought::Marker(String::from_utf8_lossy(&h.value).into_owned()));
        let id = Sought::Id(String::from_utf8_lossy(&record.id).into_owned());
        marker.into_iter().chain([id])
    }
}

/// A producer's request to store a half message (steps 1–2).
#[derive(Clone, Debug)]
pub(crate) struct Prepare {
    /// The producer service: only its sidecars decide the outcome.
    pub(crate) service: String,
    /// The sidecar instance preparing it.
    pub(crate) instance: String,
    /// The message's topic.
    pub(crate) topic: String,
    /// The partition the message goes to.
    pub(crate) partition: u32,
    /// The message as the producer sent it.
    pub(crate) message: Outgoing,
    /// Opaque to the coordinator; handed back with every check-back.
    pub(crate) context: Bytes,
    /// Names the caller's call; empty if it did not say.
    pub(crate) attempt: String,
    /// A fresh unique marker, used only if this prepare is a new
    /// transaction.
    pub(crate) marker: String,
    /// The partition's high-water mark, read before the transaction was
    /// locked (so below its message, should that ever be appended).
    pub(crate) mark: u64,
    /// Now, in milliseconds since the Unix epoch.
    pub(crate) now: i64,
}

/// Names one check-back of one transaction, so that its answer lands on
/// nothing else: not on a later transaction with the same id, and not
/// twice in the count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fence {
    /// The marker of the transaction asked about.
    pub(crate) marker: String,
    /// Which check-back of it (1 for the first).
    pub(crate) attempt: u32,
}

/// A check-back to send (step 5).
#[derive(Clone, Debug)]
pub(crate) struct CheckBack {
    /// Whose sidecars to ask.
    pub(crate) service: String,
    /// The instance to ask first.
    pub(crate) instance: String,
    /// The question.
    pub(crate) request: pb::CheckTransaction,
    /// To hand back with the answer.
    pub(crate) fence: Fence,
}

/// Where start-up recovery must look for a prepared transaction's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Seek {
    /// Its partition.
    pub(crate) tp: TopicPartition,
    /// From this offset on.
    pub(crate) from: u64,
    /// Recognised by this.
    pub(crate) sought: Sought,
}

/// The answer to the caller of an event.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Reply {
    /// The transaction is prepared, since `at_ms`.
    Prepared {
        /// When it was first prepared.
        at_ms: i64,
        /// This was a retry of a transaction prepared before.
        existed: bool,
        /// Where it stands now (PREPARED unless a retry found it decided).
        state: pb::TransactionState,
    },
    /// The transaction's outcome.
    Ended(pb::EndTransactionResponse),
}

/// Something worth counting or logging.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Note {
    /// A new transaction is open.
    Prepared,
    /// A transaction found open on start-up is open again.
    Reopened,
    /// A check-back is being sent.
    CheckSent,
    /// The transaction ended; `by_check`: by a check-back's answer or the
    /// final action.
    Decided {
        /// Committed (else rolled back).
        commit: bool,
        /// Not by its producer.
        by_check: bool,
    },
    /// No answer after the last check-back: the final action decides.
    FinalAction {
        /// Commit (else roll back).
        commit: bool,
        /// Check-backs that went unanswered.
        checks: u32,
        /// The producer service that never answered.
        service: String,
    },
    /// Start-up found the message of a commit a restart interrupted.
    FoundAfterRestart {
        /// Where it is.
        offset: u64,
    },
}

/// Something that happened to a transaction.
#[derive(Clone, Debug)]
pub(crate) enum Event {
    /// A producer prepares (or retries preparing) the transaction.
    Prepare(Box<Prepare>),
    /// A producer commits it (step 4).
    Commit {
        /// Who asks.
        service: String,
        /// Now: the appended message is stamped with it.
        now: i64,
    },
    /// A producer rolls it back (step 4).
    Rollback {
        /// Who asks.
        service: String,
        /// Now.
        now: i64,
    },
    /// The message the last [`Effect::Append`] asked for is in its
    /// partition.
    Appended {
        /// Where.
        offset: u64,
        /// Now.
        now: i64,
    },
    /// An effect of the last event failed; the ones after it were not
    /// performed.
    Failed,
    /// The check-back scheduled for `at_ms` is due.
    CheckDue {
        /// The time it was scheduled for.
        at_ms: i64,
    },
    /// The answer to a check-back (step 6).
    CheckAnswer {
        /// The fence of the check-back answered.
        fence: Fence,
        /// The producer's local state; `None`: no live session, or no
        /// answer in time.
        answer: Option<pb::LocalState>,
        /// Now.
        now: i64,
        /// The partition's high-water mark now.
        mark: u64,
    },
    /// Periodic upkeep.
    Upkeep {
        /// Now.
        now: i64,
        /// The transaction's latest record is in the part of the state log
        /// about to be dropped.
        compacting: bool,
    },
    /// Start-up: the transaction was just read back from the state log.
    Restart {
        /// Now.
        now: i64,
    },
    /// Start-up: where the message [`Effect::Seek`] looked for is
    /// (`None`: not appended).
    Found {
        /// Its offset, if found.
        offset: Option<u64>,
        /// Now.
        now: i64,
    },
}

/// What the shell must do, in order.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Write the state record durably (per the fsync policy) before going
    /// on.
    Persist(Arc<TxnRecord>),
    /// Write the state record without waiting for a sync, keeping the
    /// transaction locked until it is written: a crash before the next sync
    /// is covered by the PREPARED record's mark.
    PersistLater(Arc<TxnRecord>),
    /// Append the message to its partition, then report
    /// [`Event::Appended`] (or [`Event::Failed`]).
    Append {
        /// Where.
        tp: TopicPartition,
        /// The message, marked.
        record: Record,
    },
    /// Send a check-back without holding the transaction's lock, then
    /// report [`Event::CheckAnswer`].
    Check(Box<CheckBack>),
    /// Report [`Event::CheckDue`] at `at_ms`.
    Schedule {
        /// When.
        at_ms: i64,
    },
    /// Drop the check-back scheduled at `at_ms`: the transaction is
    /// decided, so it would find nothing to ask (an entry already taken
    /// off the schedule is no matter).
    Unschedule {
        /// When it was due.
        at_ms: i64,
    },
    /// Answer the caller.
    Reply(Result<Reply>),
    /// Start-up: look for the message, then report [`Event::Found`].
    Seek(Seek),
    /// Forget the transaction: its id names nothing any more.
    Forget,
    /// Count or log.
    Note(Note),
}

impl Effect {
    /// Whether performing it can fail (and must then be reported).
    fn may_fail(&self) -> bool {
        matches!(self, Effect::Persist(_) | Effect::Append { .. })
    }
}

/// Who is deciding an outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// The producer, waiting for the answer.
    Caller,
    /// A check-back's answer or the final action; nobody waits.
    Check,
}

impl Origin {
    fn reply(self, r: Result<Reply>) -> Vec<Effect> {
        match self {
            Origin::Caller => vec![Effect::Reply(r)],
            Origin::Check => Vec::new(),
        }
    }
}

/// One transaction id's protocol state: absent (never prepared, or
/// forgotten), prepared, committed or rolled back.
#[derive(Clone, Debug)]
pub(crate) struct TxnState {
    id: String,
    /// Shared with the undo copy and with records being written: an event
    /// that changes it copies it first (an event that does not, such as a
    /// restart's, copies nothing).
    rec: Option<Arc<TxnRecord>>,
    /// The state before the last event, while its effects may still fail.
    undo: Option<Undo>,
    /// Who asked for the append in flight.
    appending: Option<Origin>,
    /// When the next check-back is due; an earlier schedule entry is left
    /// over from an earlier transaction with this id.
    due_at: Option<i64>,
}

/// What an event changed, to put back if its effects fail.
#[derive(Clone, Debug)]
struct Undo {
    rec: Option<Arc<TxnRecord>>,
    due_at: Option<i64>,
}

impl TxnState {
    /// An id nothing is known about.
    pub(crate) fn new(id: &str) -> Self {
        TxnState {
            id: id.to_owned(),
            rec: None,
            undo: None,
            appending: None,
            due_at: None,
        }
    }

    /// A transaction as last written; report [`Event::Restart`] next.
    pub(crate) fn restore(id: &str, rec: TxnRecord) -> Self {
        TxnState {
            rec: Some(Arc::new(rec)),
            ..TxnState::new(id)
        }
    }

    /// Whether the id names a transaction now.
    pub(crate) fn exists(&self) -> bool {
        self.rec.is_some()
    }

    /// The partition an open transaction's message would go to.
    pub(crate) fn open_partition(&self) -> Option<TopicPartition> {
        self.rec
            .as_ref()
            .filter(|r| r.state == PREPARED)
            .map(|r| TopicPartition::new(r.topic.clone(), r.partition))
    }

    /// The trace context the producer sent with the half message, while it
    /// is kept (until the transaction ends).
    pub(crate) fn traceparent(&self) -> Option<String> {
        let half = self.rec.as_ref()?.message.as_ref()?;
        tandem_runtime::telemetry::from_headers(
            half.headers
                .iter()
                .map(|h| (h.name.as_str(), h.value.as_ref())),
        )
    }

    /// The transaction as the API shows it.
    pub(crate) fn view(&self) -> Option<pb::Transaction> {
        let t = self.rec.as_ref()?;
        Some(pb::Transaction {
            txn_id: self.id.clone(),
            service: t.service.clone(),
            topic: t.topic.clone(),
            state: api_state(t.state) as i32,
            prepared_at_ms: t.prepared_at_ms,
            checks: t.checks,
            resolved_by_check: t.resolved_by_check,
            position: response(&self.id, t).position,
            next_check_at_ms: if t.state == PREPARED {
                self.due_at.unwrap_or_default()
            } else {
                0
            },
            finished_at_ms: t.finished_at_ms,
            instance: t.instance.clone(),
            context: t.context.clone(),
        })
    }

    /// Applies an event; returns what must be done, in order.
    pub(crate) fn apply(&mut self, s: &TxnSettings, event: Event) -> Vec<Effect> {
        let undo = self.undo.take();
        let appending = self.appending.take();
        let event = match event {
            Event::Failed => return self.revert(undo),
            Event::Appended { offset, now } => {
                // (the undo shares the record: dropped first, the record
                // is changed in place rather than copied)
                drop(undo);
                return self.appended(offset, now, appending);
            }
            other => other,
        };
        // (sharing the record, not copying it)
        let before = Undo {
            rec: self.rec.clone(),
            due_at: self.due_at,
        };
        let effects = match event {
            Event::Failed | Event::Appended { .. } => unreachable!("answered above"),
            Event::Prepare(p) => self.prepare(s, *p),
            Event::Commit { service, now } => match self.owned_by(&service) {
                Ok(()) => self.commit(Origin::Caller, now),
                Err(e) => vec![Effect::Reply(Err(e))],
            },
            Event::Rollback { service, now } => match self.owned_by(&service) {
                Ok(()) => self.rollback(Origin::Caller, now),
                Err(e) => vec![Effect::Reply(Err(e))],
            },
            Event::CheckDue { at_ms } => self.check_due(s, at_ms),
            Event::CheckAnswer {
                fence,
                answer,
                now,
                mark,
            } => self.answered(s, &fence, answer, now, mark),
            Event::Upkeep { now, compacting } => self.upkeep(s, now, compacting),
            Event::Restart { now } => self.restart(s, now),
            Event::Found { offset, now } => self.found(s, offset, now),
        };
        if effects.iter().any(Effect::may_fail) {
            self.undo = Some(before);
        }
        effects
    }

    fn revert(&mut self, undo: Option<Undo>) -> Vec<Effect> {
        let Some(before) = undo else {
            return Vec::new();
        };
        // The schedule too: the shell asks again after a failed check-back,
        // sooner than the backoff the failed event had planned.
        self.due_at = before.due_at;
        self.rec = before.rec;
        if self.rec.is_none() {
            // A prepare whose record was never written: the id is free.
            vec![Effect::Forget]
        } else {
            Vec::new()
        }
    }

    fn not_found(&self) -> Error {
        Error::NotFound {
            what: "transaction",
            name: self.id.clone(),
        }
    }

    fn owned_by(&self, service: &str) -> Result<()> {
        let rec = self.rec.as_ref().ok_or_else(|| self.not_found())?;
        if rec.service == service {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!(
                "transaction {:?} belongs to service {:?}, not {service:?}",
                self.id, rec.service
            )))
        }
    }

    /// Steps 1–2. Identity: while the id is remembered, a retry with the
    /// same service and content is idempotent (answered with the first
    /// prepare's time and where the transaction stands now: prepared or
    /// decided), and anything else with the same id is ALREADY_EXISTS.
    fn prepare(&mut self, s: &TxnSettings, p: Prepare) -> Vec<Effect> {
        let digest = digest(&p.topic, &p.message);
        if let Some(rec) = &self.rec {
            let other_service = rec.service != p.service;
            // Digest 0: prepared before content was fingerprinted.
            let same_content = rec.digest == digest || rec.digest == 0;
            let r = if other_service || !same_content {
                Err(Error::IdConflict {
                    id: self.id.clone(),
                    what: if other_service {
                        "another service"
                    } else {
                        "another topic or message"
                    },
                })
            } else {
                // The same call again (its first answer was lost) is the
                // caller's own prepare.
                let same_call =
                    !p.attempt.is_empty() && rec.attempt == p.attempt && rec.state == PREPARED;
                Ok(Reply::Prepared {
                    at_ms: rec.prepared_at_ms,
                    existed: !same_call,
                    state: api_state(rec.state),
                })
            };
            return vec![Effect::Reply(r)];
        }
        let m = p.message.record;
        let rec = TxnRecord {
            service: p.service,
            topic: p.topic,
            partition: p.partition,
            state: PREPARED,
            prepared_at_ms: p.now,
            scan_from: p.mark,
            // Copies: the request's bytes share the buffer of the whole
            // call (up to thousands of prepares), which a transaction left
            // open would otherwise keep alive.
            message: Some(HalfRecord {
                key: m.key.as_deref().map(Bytes::copy_from_slice),
                value: Bytes::copy_from_slice(&m.value),
                headers: headers_to_wire(m.headers)
                    .into_iter()
                    .map(|h| pb::Header {
                        value: Bytes::copy_from_slice(&h.value),
                        ..h
                    })
                    .collect(),
                timestamp_ms: m.timestamp_ms,
            }),
            context: Bytes::copy_from_slice(&p.context),
            instance: p.instance,
            attempt: p.attempt,
            digest,
            marker: p.marker,
            ..TxnRecord::default()
        };
        let rec = Arc::new(rec);
        self.rec = Some(rec.clone());
        let first_check = p.now.saturating_add(millis(s.check_after));
        self.due_at = Some(first_check);
        vec![
            Effect::Persist(rec),
            Effect::Note(Note::Prepared),
            Effect::Schedule { at_ms: first_check },
            Effect::Reply(Ok(Reply::Prepared {
                at_ms: p.now,
                existed: false,
                state: pb::TransactionState::Prepared,
            })),
        ]
    }

    /// The answer to an outcome the transaction already has: the same one
    /// again is harmless, the opposite one is refused.
    fn decided(&self, commit: bool, origin: Origin) -> Option<Vec<Effect>> {
        let Some(rec) = &self.rec else {
            return Some(origin.reply(Err(self.not_found())));
        };
        match (rec.state, commit) {
            (COMMITTED, true) | (ROLLED_BACK, false) => {
                Some(origin.reply(Ok(Reply::Ended(response(&self.id, rec)))))
            }
            (COMMITTED, false) | (ROLLED_BACK, true) => {
                Some(origin.reply(Err(Error::FailedPrecondition(format!(
                    "transaction {:?} is already {}; it cannot be {}",
                    self.id,
                    state_name(rec.state),
                    if commit { "committed" } else { "rolled back" }
                )))))
            }
            _ => None,
        }
    }

    /// Commits (steps 4 and 8): the message is appended first; the
    /// transaction is COMMITTED once the append is reported.
    fn commit(&mut self, origin: Origin, now: i64) -> Vec<Effect> {
        if let Some(effects) = self.decided(true, origin) {
            return effects;
        }
        let Some(rec) = &self.rec else {
            return Vec::new(); // `decided` answered for an absent transaction
        };
        self.appending = Some(origin);
        vec![Effect::Append {
            tp: TopicPartition::new(rec.topic.clone(), rec.partition),
            record: marked_message(&self.id, rec, now),
        }]
    }

    fn appended(&mut self, offset: u64, now: i64, appending: Option<Origin>) -> Vec<Effect> {
        let Some(shared) = self.rec.as_mut().filter(|r| r.state == PREPARED) else {
            return Vec::new();
        };
        // The message is in its partition whoever asked: that is a commit.
        let by_check = appending == Some(Origin::Check);
        let rec = Arc::make_mut(shared);
        mark_committed(rec, offset, now);
        rec.resolved_by_check = by_check;
        let rec = &**shared;
        let mut effects = vec![
            Effect::PersistLater(shared.clone()),
            Effect::Note(Note::Decided {
                commit: true,
                by_check,
            }),
        ];
        effects.extend(unschedule(&mut self.due_at));
        if appending == Some(Origin::Caller) {
            effects.push(Effect::Reply(Ok(Reply::Ended(response(&self.id, rec)))));
        }
        effects
    }

    /// Rolls back (step 4, or 7): the half message is dropped for good.
    fn rollback(&mut self, origin: Origin, now: i64) -> Vec<Effect> {
        if let Some(effects) = self.decided(false, origin) {
            return effects;
        }
        let Some(shared) = self.rec.as_mut() else {
            return Vec::new();
        };
        let by_check = origin == Origin::Check;
        let rec = Arc::make_mut(shared);
        rec.state = ROLLED_BACK;
        rec.resolved_by_check = by_check;
        rec.message = None;
        forget_large_context(rec);
        rec.finished_at_ms = now;
        let rec = &**shared;
        let mut effects = vec![
            Effect::Persist(shared.clone()),
            Effect::Note(Note::Decided {
                commit: false,
                by_check,
            }),
        ];
        effects.extend(unschedule(&mut self.due_at));
        effects.extend(origin.reply(Ok(Reply::Ended(response(&self.id, rec)))));
        effects
    }

    /// Step 5: asks about a transaction still open.
    fn check_due(&mut self, s: &TxnSettings, at_ms: i64) -> Vec<Effect> {
        let Some(rec) = self.rec.as_ref().filter(|r| r.state == PREPARED) else {
            return Vec::new();
        };
        if self.due_at.is_some_and(|due| at_ms < due) {
            return Vec::new(); // scheduled for an earlier transaction with this id
        }
        let half = rec.message.clone().unwrap_or_default();
        let attempt = rec.checks + 1;
        let request = pb::CheckTransaction {
            check_id: 0,
            txn_id: self.id.clone(),
            topic: rec.topic.clone(),
            message: Some(pb::Message {
                id: self.id.clone(),
                key: half.key,
                value: half.value,
                headers: half.headers,
                partition: Some(rec.partition),
            }),
            context: rec.context.clone(),
            prepared_at_ms: rec.prepared_at_ms,
            attempt,
            check_after_ms: s.check_after.as_millis() as u64,
            timeout_ms: s.check_timeout.as_millis() as u64,
        };
        vec![
            Effect::Note(Note::CheckSent),
            Effect::Check(Box::new(CheckBack {
                service: rec.service.clone(),
                instance: rec.instance.clone(),
                request,
                fence: Fence {
                    marker: rec.marker.clone(),
                    attempt,
                },
            })),
        ]
    }

    /// Step 7: COMMIT or ROLLBACK decides; UNKNOWN or no answer counts one
    /// check-back and asks again later, until the last one leaves it to the
    /// final action.
    fn answered(
        &mut self,
        s: &TxnSettings,
        fence: &Fence,
        answer: Option<pb::LocalState>,
        now: i64,
        mark: u64,
    ) -> Vec<Effect> {
        let Some(rec) = self.rec.as_deref() else {
            return Vec::new();
        };
        if rec.state != PREPARED || rec.marker != fence.marker {
            return Vec::new(); // decided meanwhile, or about an earlier transaction
        }
        match answer {
            Some(pb::LocalState::Commit) => return self.commit(Origin::Check, now),
            Some(pb::LocalState::Rollback) => return self.rollback(Origin::Check, now),
            _ => {}
        }
        if fence.attempt != rec.checks + 1 {
            return Vec::new(); // a late answer to a check-back already counted
        }
        let Some(shared) = self.rec.as_mut() else {
            return Vec::new();
        };
        let rec = Arc::make_mut(shared);
        rec.checks += 1;
        if rec.checks >= s.max_checks {
            let commit = s.final_action == FinalAction::Commit;
            let note = Effect::Note(Note::FinalAction {
                commit,
                checks: rec.checks,
                service: rec.service.clone(),
            });
            let decision = if commit {
                self.commit(Origin::Check, now)
            } else {
                self.rollback(Origin::Check, now)
            };
            return [note].into_iter().chain(decision).collect();
        }
        // Still open, and nothing is being appended: move the mark up.
        rec.scan_from = mark;
        let checks = rec.checks;
        let at_ms = now.saturating_add(millis(check_delay(s, checks)));
        self.due_at = Some(at_ms);
        vec![Effect::Persist(shared.clone()), Effect::Schedule { at_ms }]
    }

    fn expired(s: &TxnSettings, rec: &TxnRecord, now: i64) -> bool {
        matches!(rec.state, COMMITTED | ROLLED_BACK)
            && rec.finished_at_ms < now.saturating_sub(millis(s.retention))
    }

    /// Whether upkeep has anything to do (an `Upkeep` event would have
    /// effects): most remembered transactions are not expired and their
    /// records are past the cutoff, and are left as they are.
    pub(crate) fn upkeep_due(&self, s: &TxnSettings, now: i64, compacting: bool) -> bool {
        self.rec
            .as_ref()
            .is_some_and(|rec| compacting || Self::expired(s, rec, now))
    }

    /// Forgets a transaction finished longer ago than the retention; writes
    /// one it keeps again when its record is about to be compacted away.
    fn upkeep(&mut self, s: &TxnSettings, now: i64, compacting: bool) -> Vec<Effect> {
        let Some(rec) = &self.rec else {
            return Vec::new();
        };
        if Self::expired(s, rec, now) {
            self.rec = None;
            vec![Effect::Forget]
        } else if compacting {
            // Kept, so its record outlives the segments dropped; a decided
            // one's too (its own record is normally past the cutoff, but a
            // COMMITTED record whose write failed left only PREPARED there).
            vec![Effect::Persist(rec.clone())]
        } else {
            Vec::new()
        }
    }

    /// Start-up: a crash may have come between a commit's append and its
    /// COMMITTED record, so a prepared transaction's message is looked for.
    fn restart(&mut self, s: &TxnSettings, now: i64) -> Vec<Effect> {
        let Some(rec) = &self.rec else {
            return Vec::new();
        };
        if Self::expired(s, rec, now) {
            self.rec = None;
            return vec![Effect::Forget];
        }
        if rec.state != PREPARED {
            return Vec::new();
        }
        let sought = if rec.marker.is_empty() {
            // Prepared by a version that did not mark messages.
            Sought::Id(self.id.clone())
        } else {
            Sought::Marker(rec.marker.clone())
        };
        vec![Effect::Seek(Seek {
            tp: TopicPartition::new(rec.topic.clone(), rec.partition),
            from: rec.scan_from,
            sought,
        })]
    }

    /// Start-up: found, the commit happened; not found, it is still open
    /// and is checked back when due (if that time has passed: after the
    /// reconnect grace, spread over one `check_after`).
    fn found(&mut self, s: &TxnSettings, offset: Option<u64>, now: i64) -> Vec<Effect> {
        let Some(shared) = self.rec.as_mut().filter(|r| r.state == PREPARED) else {
            return Vec::new();
        };
        match offset {
            Some(offset) => {
                mark_committed(Arc::make_mut(shared), offset, now);
                vec![
                    Effect::Persist(shared.clone()),
                    Effect::Note(Note::FoundAfterRestart { offset }),
                ]
            }
            None => {
                let due = shared
                    .prepared_at_ms
                    .saturating_add(millis(check_delay(s, shared.checks)));
                // Not before the producers' sidecars can have opened their
                // sessions again (their reconnect backoff is at most 5 s):
                // a check-back with nobody to ask would spend an attempt.
                let grace = now.saturating_add(millis(s.check_after.min(RECONNECT_GRACE)));
                // Overdue ones are spread over one check_after after the
                // grace: a restart with many open transactions does not
                // ask every producer about all of them at once.
                let at_ms = if due <= grace {
                    grace.saturating_add(spread(s, &self.id))
                } else {
                    due
                };
                self.due_at = Some(at_ms);
                vec![Effect::Note(Note::Reopened), Effect::Schedule { at_ms }]
            }
        }
    }
}

/// A decided transaction's pending check-back (its `due_at`), dropped
/// from the schedule. The effect comes after the one that makes the
/// decision durable (and is performed only if that one was); a failed
/// rollback's undo puts `due_at` back.
fn unschedule(due_at: &mut Option<i64>) -> Option<Effect> {
    due_at.take().map(|at_ms| Effect::Unschedule { at_ms })
}

/// How long after a start-up (or a takeover) open transactions wait for
/// their first check-back at least (capped by `check_after`).
const RECONNECT_GRACE: Duration = Duration::from_secs(5);

/// Where within one `check_after` a start-up puts the check-back of an
/// overdue transaction: fixed by its id (the same on every replica and
/// every restart), evenly spread over many ids.
fn spread(s: &TxnSettings, id: &str) -> i64 {
    let span = millis(s.check_after).max(1);
    i64::from(crc32c::crc32c(id.as_bytes())) % span
}

/// The message a commit appends: the half message, its id the transaction
/// id, marked as this transaction's, stamped with the commit's time (as a
/// published message is stamped when it is published: a partition's
/// stamps follow its offsets, so a search by time finds what became
/// visible after that time).
fn marked_message(id: &str, rec: &TxnRecord, now: i64) -> Record {
    let half = rec.message.clone().unwrap_or_default();
    let mut headers = headers_from_wire(half.headers);
    if !rec.marker.is_empty() {
        headers.push(Header {
            name: MARKER_HEADER.to_owned(),
            value: Bytes::copy_from_slice(rec.marker.as_bytes()),
        });
    }
    Record {
        id: Bytes::copy_from_slice(id.as_bytes()),
        key: half.key,
        value: half.value,
        headers,
        timestamp_ms: now,
    }
}

fn mark_committed(rec: &mut TxnRecord, offset: u64, now: i64) {
    rec.state = COMMITTED;
    rec.offset = offset;
    rec.message = None;
    forget_large_context(rec);
    rec.finished_at_ms = now;
}

/// Context kept once a transaction ended: a short one (a sidecar's check
/// mode, which tools such as `tandem audit` read), not an app's payload.
const KEPT_CONTEXT_BYTES: usize = 32;

fn forget_large_context(rec: &mut TxnRecord) {
    if rec.context.len() > KEPT_CONTEXT_BYTES {
        rec.context = Bytes::new();
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
    use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;

    const IDS: [&str; 3] = ["x", "y", "z"];
    const SERVICES: [&str; 2] = ["svc", "other"];
    const TOPIC: &str = "t";

    fn settings(max_checks: u32, final_action: FinalAction) -> TxnSettings {
        TxnSettings {
            check_after: Duration::from_millis(20),
            max_check_interval: Duration::from_millis(70),
            max_checks,
            final_action,
            retention: Duration::from_millis(300),
            ..TxnSettings::default()
        }
    }

    #[test]
    fn a_decoded_record_keeps_no_part_of_the_buffer_it_was_read_from() {
        let rec = TxnRecord {
            service: "svc".into(),
            message: Some(HalfRecord {
                key: Some(Bytes::from_static(b"key")),
                value: Bytes::from(vec![7u8; 100]),
                headers: vec![pb::Header {
                    name: "h".into(),
                    value: Bytes::from_static(b"v"),
                }],
                timestamp_ms: 1,
            }),
            context: Bytes::from_static(b"ctx"),
            ..TxnRecord::default()
        };
        let encoded = prost::Message::encode_to_vec(&rec);
        // as read back: the record inside a larger buffer
        let mut window = vec![0u8; 4096];
        window[100..100 + encoded.len()].copy_from_slice(&encoded);
        let window = Bytes::from(window);
        let value = window.slice(100..100 + encoded.len());
        let back = decode_record(&value).expect("decodes");
        assert_eq!(back, rec);
        let m = back.message.expect("message");
        assert!(m.value.is_unique(), "the value shares the read buffer");
        assert!(m.key.expect("key").is_unique());
        assert!(m.headers[0].value.is_unique());
        assert!(back.context.is_unique());
        // what it guards against: decoding the shared bytes themselves
        let shared = <TxnRecord as prost::Message>::decode(value.clone()).expect("decodes");
        assert!(!shared.message.expect("message").value.is_unique());
    }

    fn prepare(id: &str, service: &str, value: u8, partition: u32, mark: u64, now: i64) -> Event {
        Event::Prepare(Box::new(Prepare {
            service: service.to_owned(),
            instance: String::new(),
            topic: TOPIC.to_owned(),
            partition,
            message: Outgoing {
                partition: Some(partition),
                chosen_id: true,
                record: Record {
                    id: Bytes::copy_from_slice(id.as_bytes()),
                    key: None,
                    value: Bytes::from(vec![value]),
                    headers: Vec::new(),
                    timestamp_ms: 0,
                },
            },
            context: Bytes::new(),
            attempt: String::new(),
            marker: format!("{id}-{now}-{value}-{service}"),
            mark,
            now,
        }))
    }

    fn prepared_at(reply: Option<&Result<Reply>>) -> Option<i64> {
        match reply {
            Some(Ok(Reply::Prepared { at_ms, .. })) => Some(*at_ms),
            _ => None,
        }
    }

    fn marker_of(r: &Record) -> Option<String> {
        Sought::keys(r).find_map(|k| match k {
            Sought::Marker(m) => Some(m),
            Sought::Id(_) => None,
        })
    }

    /// Where the shell stops performing an event's effects.
    #[derive(Clone, Copy, Debug)]
    enum Fault {
        None,
        /// The first write (state record or append) fails and is reported.
        Fails,
        /// The process dies after `after` effects, and the unsynced tail of
        /// the state log keeps `kept` of its records.
        Crash {
            after: u8,
            kept: Index,
        },
    }

    #[derive(Clone, Debug)]
    enum Step {
        Prepare {
            id: usize,
            service: usize,
            value: u8,
            partition: u32,
            fault: Fault,
        },
        End {
            id: usize,
            commit: bool,
            wrong_service: bool,
            fault: Fault,
        },
        /// Time passes; due check-backs are sent.
        Advance(u16),
        /// An answer to one of the check-backs sent so far (`again`: it
        /// stays answerable, so it can come late or twice).
        Answer {
            check: Index,
            answer: Option<pb::LocalState>,
            again: bool,
            fault: Fault,
        },
        /// Upkeep; compacting, with the cutoff at `cut` of the log.
        Upkeep {
            compacting: bool,
            cut: Index,
        },
        Crash {
            kept: Index,
        },
    }

    fn fault() -> impl Strategy<Value = Fault> {
        prop_oneof![
            6 => Just(Fault::None),
            1 => Just(Fault::Fails),
            2 => (0u8..4, any::<Index>()).prop_map(|(after, kept)| Fault::Crash { after, kept }),
        ]
    }

    fn answer() -> impl Strategy<Value = Option<pb::LocalState>> {
        prop_oneof![
            Just(Some(pb::LocalState::Commit)),
            Just(Some(pb::LocalState::Rollback)),
            Just(Some(pb::LocalState::Unknown)),
            Just(None),
        ]
    }

    fn step() -> impl Strategy<Value = Step> {
        // Mostly the owner; the same id with other content conflicts.
        let service = prop_oneof![4 => Just(0usize), 1 => Just(1usize)];
        let prepare = (0..IDS.len(), service, 0u8..2, 0u32..2, fault()).prop_map(
            |(id, service, value, partition, fault)| Step::Prepare {
                id,
                service,
                value,
                partition,
                fault,
            },
        );
        let end = (
            0..IDS.len(),
            any::<bool>(),
            prop::bool::weighted(0.15),
            fault(),
        )
            .prop_map(|(id, commit, wrong_service, fault)| Step::End {
                id,
                commit,
                wrong_service,
                fault,
            });
        let answer = (any::<Index>(), answer(), prop::bool::weighted(0.3), fault()).prop_map(
            |(check, answer, again, fault)| Step::Answer {
                check,
                answer,
                again,
                fault,
            },
        );
        prop_oneof![
            4 => prepare,
            4 => end,
            4 => (1u16..120).prop_map(Step::Advance),
            4 => answer,
            1 => (any::<bool>(), any::<Index>())
                .prop_map(|(compacting, cut)| Step::Upkeep { compacting, cut }),
            1 => any::<Index>().prop_map(|kept| Step::Crash { kept }),
        ]
    }

    /// The transaction an id names now, as first prepared.
    #[derive(Clone, Debug)]
    struct Live {
        marker: String,
        service: String,
        value: Bytes,
        partition: u32,
        prepared_at: i64,
    }

    /// What performing one event's effects came to.
    #[derive(Debug, Default)]
    struct Ran {
        /// The effects performed, in order (those of `Appended` included).
        seen: Vec<Effect>,
        /// An effect failed and was reported with `Failed`.
        failed: bool,
        /// The process died part-way (and has been restarted).
        crashed: bool,
    }

    impl Ran {
        fn reply(&self) -> Option<&Result<Reply>> {
            self.seen.iter().find_map(|e| match e {
                Effect::Reply(r) => Some(r),
                _ => None,
            })
        }

        fn only_reply(&self) -> bool {
            self.seen.iter().all(|e| matches!(e, Effect::Reply(_)))
        }
    }

    /// A simulated shell, its disks and its clock, and the promises the
    /// protocol has made so far (by transaction marker).
    struct World {
        s: TxnSettings,
        now: i64,
        cores: BTreeMap<String, TxnState>,
        /// `__txn_state`: (id, record, synced). The synced records are a
        /// prefix: a durable write syncs everything before it.
        log: Vec<(String, TxnRecord, bool)>,
        /// Messages appended, by partition (appends are durable).
        parts: BTreeMap<u32, Vec<Record>>,
        due: BTreeSet<(i64, String)>,
        /// The time of each transaction's latest scheduled check-back.
        scheduled: HashMap<String, i64>,
        /// Every check-back sent, answerable (again) until taken.
        asked: Vec<(String, Fence)>,
        live: BTreeMap<String, Live>,
        /// Transactions forgotten, by marker.
        forgotten: HashMap<String, Live>,
        /// The outcome, once decided anywhere (record, reply or append).
        outcome: HashMap<String, bool>,
        /// Commits acknowledged to a caller.
        acked: BTreeSet<String>,
        /// Check-back attempts that went unanswered.
        unanswered: HashMap<String, BTreeSet<u32>>,
        markers: BTreeSet<String>,
    }

    impl World {
        fn new(s: TxnSettings) -> Self {
            World {
                s,
                now: 1_000,
                cores: BTreeMap::new(),
                log: Vec::new(),
                parts: BTreeMap::new(),
                due: BTreeSet::new(),
                scheduled: HashMap::new(),
                asked: Vec::new(),
                live: BTreeMap::new(),
                forgotten: HashMap::new(),
                outcome: HashMap::new(),
                acked: BTreeSet::new(),
                unanswered: HashMap::new(),
                markers: BTreeSet::new(),
            }
        }

        fn appended(&self, marker: &str) -> usize {
            self.parts
                .values()
                .flatten()
                .filter(|r| marker_of(r).as_deref() == Some(marker))
                .count()
        }

        fn hwm(&self, partition: u32) -> u64 {
            self.parts.get(&partition).map_or(0, |p| p.len() as u64)
        }

        fn decide(&mut self, marker: &str, commit: bool) -> Result<(), TestCaseError> {
            let before = self.outcome.insert(marker.to_owned(), commit);
            prop_assert!(
                before.is_none_or(|b| b == commit),
                "the outcome of {} changed to commit={}",
                marker,
                commit
            );
            Ok(())
        }

        /// Applies `event` to `id`'s transaction and performs the effects
        /// the way the shell does, checking each against what was promised.
        fn run(&mut self, id: &str, event: Event, fault: Fault) -> Result<Ran, TestCaseError> {
            let mut core = self.cores.remove(id).unwrap_or_else(|| TxnState::new(id));
            let before = core.rec.clone();
            let start_up = matches!(event, Event::Found { .. });
            let mut queue = VecDeque::from(core.apply(&self.s, event));
            let mut ran = Ran::default();
            while let Some(effect) = queue.pop_front() {
                if let Fault::Crash { after, kept } = fault
                    && ran.seen.len() == usize::from(after)
                {
                    ran.crashed = true;
                    self.crash(kept)?;
                    return Ok(ran);
                }
                if matches!(fault, Fault::Fails) && !ran.failed && effect.may_fail() {
                    ran.failed = true;
                    queue = core.apply(&self.s, Event::Failed).into();
                    prop_assert_eq!(&core.rec, &before, "a failure undoes the event");
                    continue;
                }
                match &effect {
                    Effect::Persist(rec) | Effect::PersistLater(rec) => {
                        self.recorded(id, rec)?;
                        let synced = matches!(effect, Effect::Persist(_));
                        if synced {
                            self.log.iter_mut().for_each(|e| e.2 = true);
                        }
                        self.log.push((id.to_owned(), (**rec).clone(), synced));
                    }
                    Effect::Append { tp, record } => {
                        let marker = marker_of(record).unwrap_or_default();
                        prop_assert_eq!(&tp.topic, TOPIC);
                        prop_assert_ne!(
                            self.outcome.get(&marker),
                            Some(&false),
                            "delivered after a rollback"
                        );
                        prop_assert_eq!(self.appended(&marker), 0, "appended twice");
                        self.decide(&marker, true)?;
                        let part = self.parts.entry(tp.partition).or_default();
                        part.push(record.clone());
                        let offset = part.len() as u64 - 1;
                        let now = self.now;
                        queue.extend(core.apply(&self.s, Event::Appended { offset, now }));
                    }
                    Effect::Check(c) => {
                        let live = self.live.get(id);
                        prop_assert_eq!(live.map(|l| &l.marker), Some(&c.fence.marker));
                        let prepared_at = live.map_or(0, |l| l.prepared_at);
                        prop_assert!(
                            self.now >= prepared_at + millis(self.s.check_after),
                            "checked back before check_after"
                        );
                        prop_assert_eq!(c.request.attempt, c.fence.attempt);
                        self.asked.push((id.to_owned(), c.fence.clone()));
                    }
                    Effect::Schedule { at_ms } => {
                        // A start-up spreads overdue check-backs over one
                        // more check_after; nothing else may.
                        let spread = if start_up {
                            millis(self.s.check_after)
                        } else {
                            0
                        };
                        let cap =
                            millis(self.s.max_check_interval.max(self.s.check_after)) + spread;
                        prop_assert!(
                            self.now <= *at_ms && *at_ms <= self.now + cap,
                            "scheduled at {} at {}",
                            at_ms,
                            self.now
                        );
                        self.due.insert((*at_ms, id.to_owned()));
                        self.scheduled.insert(id.to_owned(), *at_ms);
                    }
                    Effect::Unschedule { at_ms } => {
                        prop_assert_eq!(
                            self.scheduled.remove(id),
                            Some(*at_ms),
                            "unscheduled another check-back than {}'s latest",
                            id
                        );
                        // Only a decided transaction gives up its
                        // check-back: `settle` then finds every open one
                        // still asked about.
                        let state = core.rec.as_ref().map(|r| r.state);
                        prop_assert!(
                            matches!(state, Some(COMMITTED | ROLLED_BACK)),
                            "unscheduled {} in state {:?}",
                            id,
                            state
                        );
                        self.due.remove(&(*at_ms, id.to_owned()));
                    }
                    Effect::Reply(Ok(Reply::Ended(r))) => {
                        let marker = core.rec.as_ref().map(|r| r.marker.clone());
                        let marker = marker.unwrap_or_default();
                        let commit = r.state == pb::TransactionState::Committed as i32;
                        if commit {
                            self.acked.insert(marker.clone());
                        }
                        self.decide(&marker, commit)?;
                    }
                    Effect::Forget => {
                        if let Some(live) = self.live.remove(id) {
                            let finished = before.as_ref().filter(|r| r.marker == live.marker);
                            prop_assert!(
                                finished.is_some_and(|r| TxnState::expired(&self.s, r, self.now)),
                                "forgot a transaction before its retention ended: {:?}",
                                before
                            );
                            self.forgotten.insert(live.marker.clone(), live);
                        }
                    }
                    Effect::Reply(_) | Effect::Seek(_) | Effect::Note(_) => {}
                }
                ran.seen.push(effect);
            }
            if core.exists() {
                self.cores.insert(id.to_owned(), core);
            }
            Ok(ran)
        }

        /// A state record was written: it must agree with what came before.
        fn recorded(&mut self, id: &str, rec: &TxnRecord) -> Result<(), TestCaseError> {
            match rec.state {
                PREPARED => {
                    prop_assert!(
                        !self.outcome.contains_key(&rec.marker),
                        "PREPARED written after the outcome"
                    );
                    if self.live.get(id).is_none_or(|l| l.marker != rec.marker) {
                        prop_assert!(self.markers.insert(rec.marker.clone()), "marker reused");
                        let value = rec.message.as_ref().map(|m| m.value.clone());
                        let live = Live {
                            marker: rec.marker.clone(),
                            service: rec.service.clone(),
                            value: value.unwrap_or_default(),
                            partition: rec.partition,
                            prepared_at: rec.prepared_at_ms,
                        };
                        self.live.insert(id.to_owned(), live);
                    }
                }
                COMMITTED => {
                    self.decide(&rec.marker, true)?;
                    prop_assert_eq!(
                        self.appended(&rec.marker),
                        1,
                        "COMMITTED without its message"
                    );
                }
                _ => {
                    self.decide(&rec.marker, false)?;
                    prop_assert_eq!(self.appended(&rec.marker), 0, "ROLLED_BACK but delivered");
                }
            }
            Ok(())
        }

        /// The process dies and starts again from what is on disk.
        fn crash(&mut self, kept: Index) -> Result<(), TestCaseError> {
            self.cores.clear();
            self.due.clear();
            self.scheduled.clear();
            let synced = self.log.iter().take_while(|e| e.2).count();
            self.log
                .truncate(synced + kept.index(self.log.len() - synced + 1));
            self.log.iter_mut().for_each(|e| e.2 = true);
            let mut latest = BTreeMap::new();
            for (id, rec, _) in &self.log {
                latest.insert(id.clone(), rec.clone());
            }
            let mut seeks = Vec::new();
            for (id, rec) in latest {
                self.cores.insert(id.clone(), TxnState::restore(&id, rec));
                let now = self.now;
                for e in self.run(&id, Event::Restart { now }, Fault::None)?.seen {
                    if let Effect::Seek(seek) = e {
                        seeks.push((id.clone(), seek));
                    }
                }
            }
            for (id, seek) in seeks {
                let part = self.parts.get(&seek.tp.partition).map_or(&[][..], |p| p);
                let offset = (seek.from..part.len() as u64)
                    .find(|&o| Sought::keys(&part[o as usize]).any(|k| k == seek.sought));
                let now = self.now;
                self.run(&id, Event::Found { offset, now }, Fault::None)?;
            }
            for (id, l) in &self.live {
                let back = self.cores.get(id).and_then(|c| c.rec.as_ref());
                prop_assert_eq!(
                    back.map(|r| &r.marker),
                    Some(&l.marker),
                    "a restart brings back what was prepared and not forgotten"
                );
            }
            let returned: Vec<(String, String)> = self
                .cores
                .iter()
                .filter(|(id, _)| !self.live.contains_key(*id))
                .filter_map(|(id, c)| c.rec.as_ref().map(|r| (id.clone(), r.marker.clone())))
                .collect();
            for (id, marker) in returned {
                // Forgotten before its COMMITTED record was synced: the
                // restart finds its message again, so it is remembered
                // (committed) for another retention.
                prop_assert_eq!(self.outcome.get(&marker), Some(&true), "{} came back", id);
                let live = self.forgotten.remove(&marker);
                prop_assert!(live.is_some(), "{} came back but was never forgotten", id);
                if let Some(live) = live {
                    self.live.insert(id, live);
                }
            }
            Ok(())
        }

        /// Feeds an answer to a check-back, like the shell: a failure is
        /// asked about again later.
        fn answer(
            &mut self,
            id: &str,
            fence: Fence,
            answer: Option<pb::LocalState>,
            fault: Fault,
        ) -> Result<(), TestCaseError> {
            let core = self.cores.get(id);
            let open = core
                .and_then(|c| c.rec.as_ref())
                .is_some_and(|r| r.state == PREPARED && r.marker == fence.marker);
            let mark = core
                .and_then(TxnState::open_partition)
                .map_or(0, |tp| self.hwm(tp.partition));
            let unanswered = !matches!(
                answer,
                Some(pb::LocalState::Commit | pb::LocalState::Rollback)
            );
            if open && unanswered {
                self.unanswered
                    .entry(fence.marker.clone())
                    .or_default()
                    .insert(fence.attempt);
            }
            let now = self.now;
            let event = Event::CheckAnswer {
                fence: fence.clone(),
                answer,
                now,
                mark,
            };
            let ran = self.run(id, event, fault)?;
            if !open {
                prop_assert!(
                    ran.seen.is_empty(),
                    "an answer about another transaction or a decided one changed something: {:?}",
                    ran.seen
                );
            }
            let final_action = ran
                .seen
                .iter()
                .any(|e| matches!(e, Effect::Note(Note::FinalAction { .. })));
            if final_action {
                prop_assert!(unanswered, "final action after an answer");
                prop_assert_eq!(
                    fence.attempt,
                    self.s.max_checks,
                    "final action before the last check-back"
                );
                let asked = self
                    .unanswered
                    .get(&fence.marker)
                    .cloned()
                    .unwrap_or_default();
                prop_assert!(
                    (1..=self.s.max_checks).all(|a| asked.contains(&a)),
                    "final action before every check-back went unanswered: {:?}",
                    asked
                );
            }
            for e in &ran.seen {
                if let Effect::Note(Note::Decided { commit, by_check }) = e {
                    prop_assert!(by_check, "an answer decided as if the producer had");
                    if !final_action {
                        let told = if *commit {
                            pb::LocalState::Commit
                        } else {
                            pb::LocalState::Rollback
                        };
                        prop_assert_eq!(answer, Some(told), "decided against the answer");
                    }
                }
            }
            if ran.failed {
                self.due
                    .insert((now + millis(self.s.check_after), id.to_owned()));
            }
            Ok(())
        }

        /// Time passes; check-backs fall due and are sent.
        fn advance(&mut self, by: i64) -> Result<(), TestCaseError> {
            self.now += by;
            while let Some((at, id)) = self.due.first().cloned()
                && at <= self.now
            {
                self.due.remove(&(at, id.clone()));
                self.run(&id, Event::CheckDue { at_ms: at }, Fault::None)?;
            }
            Ok(())
        }

        /// A producer prepares: new, an identical retry, or a conflict.
        fn prepare(
            &mut self,
            id: &str,
            service: &str,
            (value, partition): (u8, u32),
            fault: Fault,
        ) -> Result<(), TestCaseError> {
            let live = self.live.get(id).cloned();
            let before = self.cores.get(id).and_then(|c| c.rec.clone());
            let mark = self.hwm(partition);
            let event = prepare(id, service, value, partition, mark, self.now);
            let ran = self.run(id, event, fault)?;
            if ran.crashed {
                return Ok(());
            }
            let reply = ran.reply();
            let Some(l) = live else {
                if !ran.failed {
                    prop_assert_eq!(prepared_at(reply), Some(self.now), "{:?}", reply);
                }
                return Ok(());
            };
            prop_assert!(ran.only_reply(), "a retry changes nothing: {:?}", ran.seen);
            let after = self.cores.get(id).and_then(|c| c.rec.clone());
            prop_assert_eq!(after, before, "a retry changes nothing");
            let same =
                l.service == service && l.value.as_ref() == [value] && l.partition == partition;
            if !same {
                let conflict = matches!(reply, Some(Err(Error::IdConflict { .. })));
                prop_assert!(conflict, "{:?}", reply);
            } else if let Some(&committed) = self.outcome.get(&l.marker) {
                // a retry of a decided transaction learns its outcome
                let want = if committed {
                    pb::TransactionState::Committed
                } else {
                    pb::TransactionState::RolledBack
                };
                let told = matches!(reply, Some(Ok(Reply::Prepared { existed: true, state, .. })) if *state == want);
                prop_assert!(told, "{:?}", reply);
            } else {
                prop_assert_eq!(prepared_at(reply), Some(l.prepared_at), "{:?}", reply);
            }
            Ok(())
        }

        /// A producer commits or rolls back, as the owner or not.
        fn end(
            &mut self,
            id: &str,
            commit: bool,
            wrong_service: bool,
            fault: Fault,
        ) -> Result<(), TestCaseError> {
            let live = self.live.get(id).cloned();
            let owner = live.as_ref().map_or(SERVICES[0], |l| l.service.as_str());
            let service = match (wrong_service, owner == SERVICES[0]) {
                (false, _) => owner,
                (true, true) => SERVICES[1],
                (true, false) => SERVICES[0],
            }
            .to_owned();
            let before = self.cores.get(id).and_then(|c| c.rec.clone());
            let event = if commit {
                let now = self.now;
                Event::Commit { service, now }
            } else {
                let now = self.now;
                Event::Rollback { service, now }
            };
            let ran = self.run(id, event, fault)?;
            if ran.crashed {
                return Ok(());
            }
            let reply = ran.reply();
            let Some(l) = live else {
                let unknown = matches!(reply, Some(Err(Error::NotFound { .. })));
                prop_assert!(unknown, "{:?}", reply);
                return Ok(());
            };
            let refused = wrong_service || self.outcome.get(&l.marker) == Some(&!commit);
            if refused || ran.failed {
                prop_assert!(ran.only_reply(), "{:?}", ran.seen);
                let after = self.cores.get(id).and_then(|c| c.rec.clone());
                prop_assert_eq!(after, before, "a refused or failed outcome changes nothing");
            }
            let state = match reply {
                Some(Ok(Reply::Ended(r))) => Some(r.state),
                _ => None,
            };
            if wrong_service {
                let denied = matches!(reply, Some(Err(Error::PermissionDenied(_))));
                prop_assert!(denied, "{:?}", reply);
            } else if refused {
                let refused = matches!(reply, Some(Err(Error::FailedPrecondition(_))));
                prop_assert!(refused, "{:?}", reply);
            } else if !ran.failed {
                let wanted = if commit {
                    pb::TransactionState::Committed
                } else {
                    pb::TransactionState::RolledBack
                };
                prop_assert_eq!(state, Some(wanted as i32), "{:?}", reply);
            }
            Ok(())
        }

        fn step(&mut self, step: Step) -> Result<(), TestCaseError> {
            match step {
                Step::Prepare {
                    id,
                    service,
                    value,
                    partition,
                    fault,
                } => self.prepare(IDS[id], SERVICES[service], (value, partition), fault)?,
                Step::End {
                    id,
                    commit,
                    wrong_service,
                    fault,
                } => self.end(IDS[id], commit, wrong_service, fault)?,
                Step::Advance(by) => self.advance(i64::from(by))?,
                Step::Answer {
                    check,
                    answer,
                    again,
                    fault,
                } => {
                    if self.asked.is_empty() {
                        return Ok(());
                    }
                    let i = check.index(self.asked.len());
                    let (id, fence) = if again {
                        self.asked[i].clone()
                    } else {
                        self.asked.remove(i)
                    };
                    self.answer(&id, fence, answer, fault)?;
                }
                Step::Upkeep { compacting, cut } => {
                    // As `maintain()`: a compacting round has a cutoff (here
                    // any position of the log); a transaction whose latest
                    // record lies below it is compacting, and upkeep
                    // rewrites it if kept; then the shell syncs the log and
                    // drops what lies below the cutoff.
                    let cutoff = if compacting {
                        cut.index(self.log.len() + 1)
                    } else {
                        0
                    };
                    let mut latest = HashMap::new();
                    for (at, (id, _, _)) in self.log.iter().enumerate() {
                        latest.insert(id.clone(), at);
                    }
                    let ids: Vec<String> = self.cores.keys().cloned().collect();
                    for id in ids {
                        let now = self.now;
                        let below = latest.get(&id).is_some_and(|&at| at < cutoff);
                        let due = self.cores[&id].upkeep_due(&self.s, now, below);
                        let event = Event::Upkeep {
                            now,
                            compacting: below,
                        };
                        let ran = self.run(&id, event, Fault::None)?;
                        // The shell skips what is not due: nothing may be.
                        prop_assert_eq!(due, !ran.seen.is_empty(), "{} upkeep_due", id);
                    }
                    if cutoff > 0 {
                        self.log.iter_mut().for_each(|e| e.2 = true);
                        self.log.drain(..cutoff);
                    }
                }
                Step::Crash { kept } => self.crash(kept)?,
            }
            self.consistent()
        }

        /// Holds after every step.
        fn consistent(&self) -> Result<(), TestCaseError> {
            for marker in &self.acked {
                prop_assert_eq!(
                    self.appended(marker),
                    1,
                    "an acknowledged commit is delivered once"
                );
            }
            for (marker, commit) in &self.outcome {
                prop_assert_eq!(
                    self.appended(marker),
                    usize::from(*commit),
                    "delivered iff committed"
                );
            }
            for core in self.cores.values() {
                let Some(rec) = &core.rec else { continue };
                if let Some(commit) = self.outcome.get(&rec.marker) {
                    prop_assert_eq!(
                        rec.state,
                        if *commit { COMMITTED } else { ROLLED_BACK },
                        "the state forgot the outcome"
                    );
                }
            }
            Ok(())
        }

        /// Nobody answers any more: every open transaction reaches its
        /// final action.
        fn settle(&mut self) -> Result<(), TestCaseError> {
            let rounds = (self.s.max_checks as usize + 2) * IDS.len() + 20;
            for _ in 0..rounds {
                // Check-backs in flight time out, then the next fall due.
                for (id, fence) in std::mem::take(&mut self.asked) {
                    self.answer(&id, fence, None, Fault::None)?;
                }
                let Some((at, _)) = self.due.first().cloned() else {
                    break;
                };
                self.advance((at - self.now).max(0))?;
            }
            self.consistent()?;
            for (id, core) in &self.cores {
                let state = core.rec.as_ref().map(|r| r.state);
                prop_assert!(
                    state != Some(PREPARED),
                    "{} still open after every check-back",
                    id
                );
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]
        #[test]
        fn outcomes_are_never_lost_reversed_or_delivered_twice(
            max_checks in 1u32..4,
            commit_finally in any::<bool>(),
            steps in prop::collection::vec(step(), 1..80),
            kept in any::<Index>(),
        ) {
            let action = if commit_finally { FinalAction::Commit } else { FinalAction::Rollback };
            let mut w = World::new(settings(max_checks, action));
            for s in steps {
                w.step(s)?;
            }
            // Every open transaction is decided, with or without a restart.
            w.settle()?;
            w.crash(kept)?;
            w.settle()?;
        }
    }

    #[test]
    fn a_conflicting_prepare_is_refused_and_an_identical_one_is_idempotent() {
        let s = settings(3, FinalAction::Rollback);
        let mut t = TxnState::new("x");
        let effects = t.apply(&s, prepare("x", "svc", 1, 0, 0, 100));
        assert!(matches!(effects[0], Effect::Persist(_)));
        let first = t.rec.clone();
        let retry = t.apply(&s, prepare("x", "svc", 1, 0, 0, 200));
        assert!(matches!(
            retry.as_slice(),
            [Effect::Reply(Ok(Reply::Prepared {
                at_ms: 100,
                existed: true,
                state: pb::TransactionState::Prepared
            }))]
        ));
        for other in [
            prepare("x", "svc", 2, 0, 0, 300),
            prepare("x", "svc", 1, 1, 0, 300),
            prepare("x", "other", 1, 0, 0, 300),
        ] {
            let refused = t.apply(&s, other);
            assert!(
                matches!(
                    refused.as_slice(),
                    [Effect::Reply(Err(Error::IdConflict { .. }))]
                ),
                "{refused:?}"
            );
            assert_eq!(t.rec, first);
        }
    }

    #[test]
    fn a_late_or_misdirected_answer_changes_nothing() {
        let s = settings(3, FinalAction::Rollback);
        let mut t = TxnState::new("x");
        t.apply(&s, prepare("x", "svc", 1, 0, 0, 0));
        let ask = |t: &mut TxnState, at_ms| match t.apply(&s, Event::CheckDue { at_ms }).pop() {
            Some(Effect::Check(c)) => c.fence,
            other => panic!("no check-back: {other:?}"),
        };
        let unanswered = |fence: &Fence| Event::CheckAnswer {
            fence: fence.clone(),
            answer: None,
            now: 50,
            mark: 0,
        };
        assert!(
            t.apply(&s, Event::CheckDue { at_ms: 5 }).is_empty(),
            "not due yet"
        );
        let first = ask(&mut t, 20);
        assert_eq!(first.attempt, 1);
        assert_eq!(
            t.apply(&s, unanswered(&first)).len(),
            2,
            "counted, asked again later"
        );
        assert!(t.apply(&s, unanswered(&first)).is_empty(), "counted once");
        let other = Fence {
            marker: "another transaction with this id".into(),
            attempt: 2,
        };
        let commit = Event::CheckAnswer {
            fence: other,
            answer: Some(pb::LocalState::Commit),
            now: 60,
            mark: 0,
        };
        assert!(t.apply(&s, commit).is_empty());
        assert_eq!(
            t.rec.as_ref().map(|r| (r.state, r.checks)),
            Some((PREPARED, 1))
        );
    }

    #[test]
    fn a_failed_write_puts_the_transaction_back() {
        let s = settings(3, FinalAction::Rollback);
        let mut t = TxnState::new("x");
        t.apply(&s, prepare("x", "svc", 1, 0, 0, 0));
        assert!(matches!(
            t.apply(&s, Event::Failed).as_slice(),
            [Effect::Forget]
        ));
        assert!(!t.exists(), "a prepare never written is forgotten");

        t.apply(&s, prepare("x", "svc", 1, 0, 0, 0));
        let rollback = Event::Rollback {
            service: "svc".into(),
            now: 10,
        };
        assert!(matches!(t.apply(&s, rollback)[0], Effect::Persist(_)));
        assert!(t.apply(&s, Event::Failed).is_empty());
        assert_eq!(t.rec.as_ref().map(|r| r.state), Some(PREPARED));
    }
}
