//! The saga driver: the async shell around the pure state machine of
//! `tandem-sagas`. One task owns every saga; starts, answers and reads come
//! to it over a channel, time wakes it at the earliest deadline.
//!
//! Durability: a saga's whole state (its definition, who started it and its
//! progress) is upserted in the internal log `__saga_state` under its id
//! after every change, and the changes of everything handled at once are
//! appended together (one group commit) before any call they lead to goes
//! out and before a start is acknowledged. So a call number is durable
//! before its call, an acknowledged start survives a crash, and start-up
//! rebuilds every saga from the latest record of each id, repeating the
//! calls that were out. A finished saga is remembered `saga_retention`
//! after it ended, then forgotten (a tombstone).
//!
//! Branch calls go down a session of the branch's service (see
//! `session.rs`) and their answers come back here as events; a call whose
//! answer does not come within its timeout counts as unknown.
//!
//! The log is compacted once it holds twice as many records as there are
//! sagas (and at least `COMPACT_EVERY`): the snapshot is every saga and the
//! `__sagas` cursor. A save that fails stops the driver and is reported
//! through [`Sagas::failed`], which stops the process from serving.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tandem_proto::coordinator as pb;
use tandem_sagas::{Effect, Event, Op, Outcome, Saga, SagaDef, SagaRecord, SagaStatus};
use tandem_storage::{Log, Record};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::error::{Error, Result};
use crate::saga_wire::{definition_error, definition_from_wire, to_wire};
use crate::session::{BranchReply, Sessions};
use crate::statelog::{StateLog, now_ms, upsert};

/// The internal log holding the sagas.
const LOG: &str = "__saga_state";
/// The topic whose committed messages start sagas: a saga begun with a
/// local transaction is a transactional message to it, carrying its
/// `StartSagaRequest`.
pub(crate) const SAGA_TOPIC: &str = "__sagas";
/// The key in `__saga_state` of the next offset of `__sagas` to read (no
/// saga id can contain a control character).
const CURSOR: &[u8] = b"\0cursor";
/// Records appended between two compactions of the log.
const COMPACT_EVERY: u64 = 10_000;
/// Most sagas one ListSagas answers with.
pub(crate) const MAX_LIST: usize = 1000;
/// How long an id checked for a saga begun with a transaction stays held
/// for that saga (its service and definition) until the transaction
/// commits: longer than a transaction stays open with the default
/// check-back settings.
const HOLD_MS: i64 = 3_600_000;

/// A saga as stored: everything needed to rebuild it.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredSaga {
    #[prost(string, tag = "1")]
    service: String,
    #[prost(message, optional, tag = "2")]
    definition: Option<SagaDef>,
    #[prost(message, optional, tag = "3")]
    progress: Option<SagaRecord>,
}

struct List {
    status: Option<SagaStatus>,
    limit: usize,
    reply: oneshot::Sender<Vec<pb::Saga>>,
}

enum Command {
    Start {
        id: String,
        service: String,
        def: SagaDef,
        reply: oneshot::Sender<Result<pb::Saga>>,
    },
    Answer {
        id: String,
        branch: u32,
        op: Op,
        call: u32,
        outcome: Outcome,
    },
    Get {
        id: String,
        reply: oneshot::Sender<Result<pb::Saga>>,
    },
    List(List),
    /// Whether `id` names a saga with another definition or service.
    Conflicts {
        id: String,
        service: String,
        def: SagaDef,
        reply: oneshot::Sender<bool>,
    },
    /// A committed start read from `__sagas` at `offset`.
    Logged {
        offset: u64,
        req: pb::StartSagaRequest,
    },
}

/// The handle the gRPC service uses.
#[derive(Clone)]
pub(crate) struct Sagas {
    tx: mpsc::Sender<Command>,
    failed: watch::Receiver<Option<String>>,
}

struct Entry {
    service: String,
    saga: Saga,
    /// Its key in `Driver::due`, if it waits on time.
    due: Option<i64>,
}

struct Driver<L> {
    log: StateLog<L>,
    sagas: HashMap<String, Entry>,
    due: BTreeSet<(i64, String)>,
    finished: BTreeSet<(i64, String)>,
    retention: i64,
    sessions: Arc<Sessions>,
    tx: mpsc::Sender<Command>,
    /// Branch calls out, and the tail of `__sagas`.
    calls: JoinSet<()>,
    /// The next offset of `__sagas` to start a saga from.
    cursor: u64,
    /// Ids held for sagas begun with a transaction not yet started: their
    /// service, definition and the end of the hold (kept in memory only).
    held: HashMap<String, (String, SagaDef, i64)>,
    compact_every: u64,
    failed: watch::Sender<Option<String>>,
}

/// What handling a batch of commands produced, performed once it is saved.
#[derive(Default)]
struct Work {
    records: Vec<Record>,
    calls: Vec<(String, tandem_sagas::Call)>,
    replies: Vec<(oneshot::Sender<Result<pb::Saga>>, String)>,
    lists: Vec<List>,
}

impl Sagas {
    /// Opens `__saga_state` in `internal`, rebuilds the sagas and starts the
    /// driver; it stops when `shutdown` turns true.
    pub(crate) async fn open<L: Log + Clone>(
        data: L,
        internal: L,
        sessions: Arc<Sessions>,
        retention: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Sagas, tokio::task::JoinHandle<()>)> {
        Self::open_with(data, internal, sessions, retention, COMPACT_EVERY, shutdown).await
    }

    async fn open_with<L: Log + Clone>(
        data: L,
        internal: L,
        sessions: Arc<Sessions>,
        retention: Duration,
        compact_every: u64,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Sagas, tokio::task::JoinHandle<()>)> {
        let (log, records) = StateLog::open(internal, LOG, compact_every).await?;
        let mut cursor = 0u64;
        let mut latest: HashMap<Vec<u8>, (u64, bytes::Bytes)> = HashMap::new();
        for r in records {
            let key = r.record.key.clone().unwrap_or_default().to_vec();
            if key == CURSOR {
                let bytes: [u8; 8] =
                    r.record.value[..]
                        .try_into()
                        .map_err(|_| Error::CorruptState {
                            log: LOG,
                            offset: r.offset,
                            reason: "the cursor is not 8 bytes".into(),
                        })?;
                cursor = u64::from_le_bytes(bytes);
                continue;
            }
            if r.record.value.is_empty() {
                latest.remove(&key);
            } else {
                latest.insert(key, (r.offset, r.record.value));
            }
        }
        // A cursor past the end (the topic's tail lost in a crash with a
        // relaxed fsync) would skip starts written there later.
        let tp = tandem_storage::TopicPartition::new(SAGA_TOPIC, 0);
        cursor = cursor.min(data.offsets(&tp)?.high_water_mark);
        let (tx, rx) = mpsc::channel(1024);
        let (failed, failed_rx) = watch::channel(None);
        let mut driver = Driver {
            log,
            sagas: HashMap::with_capacity(latest.len()),
            due: BTreeSet::new(),
            finished: BTreeSet::new(),
            retention: i64::try_from(retention.as_millis()).unwrap_or(i64::MAX),
            sessions,
            tx: tx.clone(),
            calls: JoinSet::new(),
            cursor,
            held: HashMap::new(),
            compact_every,
            failed,
        };
        let now = now_ms();
        let mut work = Work::default();
        for (key, (offset, value)) in latest {
            let id = String::from_utf8_lossy(&key).into_owned();
            let corrupt = |reason: String| Error::CorruptState {
                log: LOG,
                offset,
                reason: format!("saga {id:?}: {reason}"),
            };
            // (from a slice: the payloads are copied, not kept as slices
            // of the whole read buffer for the saga's life)
            let stored = <StoredSaga as prost::Message>::decode(&value[..])
                .map_err(|e| corrupt(e.to_string()))?;
            let (Some(def), Some(progress)) = (stored.definition, stored.progress) else {
                return Err(corrupt("definition or progress missing".into()));
            };
            let saga = Saga::restore(def, progress).map_err(|e| corrupt(e.to_string()))?;
            driver.insert(id.clone(), stored.service, saga);
            let effects = driver.apply(&id, Event::Recover, now);
            driver.take(&id, effects, &mut work);
        }
        if !work.records.is_empty() {
            tracing::info!(
                open = work.records.len(),
                "sagas restored: repeating the calls that were out"
            );
        }
        driver.save(&mut work).await?;
        driver.perform(work);
        driver.calls.spawn(tail(data, cursor, tx.clone()));
        let task = tokio::spawn(driver.run(rx, shutdown));
        Ok((
            Sagas {
                tx,
                failed: failed_rx,
            },
            task,
        ))
    }

    /// Resolves to the cause once the driver could not save and stopped.
    pub(crate) fn failed(&self) -> watch::Receiver<Option<String>> {
        self.failed.clone()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }

    /// Starts saga `id` for `service` (see the module doc); answers once it
    /// is durable.
    pub(crate) async fn start(
        &self,
        id: String,
        service: String,
        def: SagaDef,
    ) -> Result<pb::Saga> {
        self.ask(|reply| Command::Start {
            id,
            service,
            def,
            reply,
        })
        .await?
    }

    /// ALREADY_EXISTS if `id` names a saga with another definition or
    /// service, or is held for one begun with a transaction; otherwise
    /// holds it for this one (checked when a saga is begun with a
    /// transaction, so that its commit does not meet a taken id). Holds
    /// live in memory: a start racing one across a coordinator restart can
    /// still meet a taken id at commit, and is then dropped, with an error
    /// in the log.
    pub(crate) async fn check_free(&self, id: String, service: String, def: SagaDef) -> Result<()> {
        let name = id.clone();
        let taken = self
            .ask(|reply| Command::Conflicts {
                id,
                service,
                def,
                reply,
            })
            .await?;
        match taken {
            true => Err(Error::AlreadyExists {
                what: "saga (with another definition or service)",
                name,
            }),
            false => Ok(()),
        }
    }

    /// Saga `id`, or NOT_FOUND.
    pub(crate) async fn get(&self, id: String) -> Result<pb::Saga> {
        self.ask(|reply| Command::Get { id, reply }).await?
    }

    /// Up to `limit` sagas, newest first.
    pub(crate) async fn list(
        &self,
        status: Option<SagaStatus>,
        limit: usize,
    ) -> Result<Vec<pb::Saga>> {
        self.ask(|reply| {
            Command::List(List {
                status,
                limit,
                reply,
            })
        })
        .await
    }
}

impl<L: Log + Clone> Driver<L> {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, mut shutdown: watch::Receiver<bool>) {
        let mut batch = Vec::new();
        loop {
            let wake = self.due.first().map(|(t, _)| *t);
            let sleep = async {
                match wake {
                    Some(t) => {
                        let ms = u64::try_from(t.saturating_sub(now_ms())).unwrap_or(0);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                n = rx.recv_many(&mut batch, 256) => if n == 0 { return },
                () = sleep => {}
                Some(_) = self.calls.join_next(), if !self.calls.is_empty() => continue,
                _ = shutdown.wait_for(|s| *s) => return,
            }
            let now = now_ms();
            let mut work = Work::default();
            for cmd in batch.drain(..) {
                self.handle(cmd, now, &mut work);
            }
            self.tick(now, &mut work);
            if let Err(e) = self.save(&mut work).await {
                // What is in memory is ahead of what is stored: stop, and
                // make the process stop serving.
                let cause = format!("cannot save sagas: {e}");
                tracing::error!(%cause, "the saga driver stops");
                for (reply, _) in work.replies {
                    let _ = reply.send(Err(Error::StorageFailed(cause.clone())));
                }
                self.failed.send_replace(Some(cause));
                return;
            }
            self.perform(work);
            let live = self.sagas.len() as u64 + 1;
            if self.log.appended_since_compaction() >= self.compact_every.max(2 * live) {
                let mut snapshot: Vec<Record> =
                    self.sagas.keys().map(|id| self.record(id)).collect();
                snapshot.push(self.cursor_record());
                if let Err(e) = self.log.compact(snapshot).await {
                    let cause = format!("cannot compact {LOG}: {e}");
                    tracing::error!(%cause, "the saga driver stops");
                    self.failed.send_replace(Some(cause));
                    return;
                }
            }
        }
    }

    fn handle(&mut self, cmd: Command, now: i64, work: &mut Work) {
        match cmd {
            Command::Start {
                id,
                service,
                def,
                reply,
            } => {
                if self.taken(&id, &service, &def, now) {
                    let _ = reply.send(Err(Error::AlreadyExists {
                        what: "saga (with another definition or service)",
                        name: id,
                    }));
                    return;
                }
                if self.sagas.contains_key(&id) {
                    work.replies.push((reply, id));
                    return;
                }
                match Saga::start(&id, def, now) {
                    Ok((saga, effects)) => {
                        self.insert(id.clone(), service, saga);
                        self.take(&id, effects, work);
                        work.replies.push((reply, id));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(definition_error("definition", e)));
                    }
                }
            }
            Command::Answer {
                id,
                branch,
                op,
                call,
                outcome,
            } => {
                let event = Event::Answer {
                    branch,
                    op,
                    call,
                    outcome,
                };
                let effects = self.apply(&id, event, now);
                self.take(&id, effects, work);
            }
            Command::Get { id, reply } => match self.sagas.contains_key(&id) {
                true => work.replies.push((reply, id)),
                false => {
                    let _ = reply.send(Err(Error::NotFound {
                        what: "saga",
                        name: id,
                    }));
                }
            },
            Command::Logged { offset, req } => {
                if offset < self.cursor {
                    return; // read again after a restart: started already
                }
                self.cursor = offset + 1;
                work.records.push(self.cursor_record());
                let id = req.saga_id.clone();
                self.held.remove(&id);
                let def = req
                    .definition
                    .ok_or_else(|| Error::invalid("definition", "is required"))
                    .and_then(|d| definition_from_wire("definition", d));
                let started = def.and_then(|def| match self.sagas.get(&id) {
                    Some(e) if e.saga.definition() == &def && e.service == req.service => Ok(None),
                    Some(_) => Err(Error::AlreadyExists {
                        what: "saga (with another definition or service)",
                        name: id.clone(),
                    }),
                    None => Saga::start(&id, def, now)
                        .map(Some)
                        .map_err(|e| definition_error("definition", e)),
                });
                match started {
                    Ok(Some((saga, effects))) => {
                        tracing::info!(saga = %id, service = %req.service, offset, "saga started by a committed transaction");
                        self.insert(id.clone(), req.service, saga);
                        self.take(&id, effects, work);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(saga = %id, offset, error = %e, "a committed saga start cannot start: dropped");
                    }
                }
            }
            // Answered once what this batch changed is saved.
            Command::List(list) => work.lists.push(list),
            Command::Conflicts {
                id,
                service,
                def,
                reply,
            } => {
                let taken = self.taken(&id, &service, &def, now);
                if !taken && !self.sagas.contains_key(&id) {
                    self.held
                        .insert(id, (service, def, now.saturating_add(HOLD_MS)));
                }
                let _ = reply.send(taken);
            }
        }
    }

    /// Fires what is due and forgets sagas finished longer ago than the
    /// retention.
    fn tick(&mut self, now: i64, work: &mut Work) {
        while let Some((t, id)) = self.due.first().cloned() {
            if t > now {
                break;
            }
            self.due.remove(&(t, id.clone()));
            if let Some(e) = self.sagas.get_mut(&id) {
                e.due = None;
            }
            let effects = self.apply(&id, Event::Tick, now);
            self.take(&id, effects, work);
        }
        while let Some((t, id)) = self.finished.first().cloned() {
            if t.saturating_add(self.retention) > now {
                break;
            }
            self.finished.remove(&(t, id.clone()));
            self.sagas.remove(&id);
            work.records.push(upsert(id.into_bytes(), Vec::new()));
        }
    }

    fn insert(&mut self, id: String, service: String, saga: Saga) {
        if saga.is_finished() {
            self.finished
                .insert((saga.record().finished_ms, id.clone()));
        }
        self.sagas.insert(
            id.clone(),
            Entry {
                service,
                saga,
                due: None,
            },
        );
        self.reschedule(&id);
    }

    fn apply(&mut self, id: &str, event: Event, now: i64) -> Vec<Effect> {
        let Some(e) = self.sagas.get_mut(id) else {
            return Vec::new(); // forgotten meanwhile: a late answer
        };
        let effects = e.saga.apply(event, now);
        self.reschedule(id);
        effects
    }

    fn reschedule(&mut self, id: &str) {
        let Some(e) = self.sagas.get_mut(id) else {
            return;
        };
        let next = e.saga.next_deadline();
        if next != e.due {
            if let Some(old) = e.due {
                self.due.remove(&(old, id.to_owned()));
            }
            if let Some(t) = next {
                self.due.insert((t, id.to_owned()));
            }
            e.due = next;
        }
    }

    fn take(&mut self, id: &str, effects: Vec<Effect>, work: &mut Work) {
        for effect in effects {
            match effect {
                Effect::Save(_) => work.records.push(self.record(id)),
                Effect::Call(c) => work.calls.push((id.to_owned(), c)),
                Effect::Finish(status) => {
                    let finished_ms = self.sagas[id].saga.record().finished_ms;
                    self.finished.insert((finished_ms, id.to_owned()));
                    tracing::info!(saga = id, ?status, "saga finished");
                }
            }
        }
    }

    fn record(&self, id: &str) -> Record {
        let e = &self.sagas[id];
        let stored = StoredSaga {
            service: e.service.clone(),
            definition: Some(e.saga.definition().clone()),
            progress: Some(e.saga.record().clone()),
        };
        upsert(
            id.as_bytes().to_vec(),
            prost::Message::encode_to_vec(&stored),
        )
    }

    /// Whether `id` names a saga, or is held for one begun with a
    /// transaction, with another definition or service.
    fn taken(&mut self, id: &str, service: &str, def: &SagaDef, now: i64) -> bool {
        if let Some(e) = self.sagas.get(id) {
            return e.saga.definition() != def || e.service != service;
        }
        if self.held.len() > 100_000 {
            self.held.retain(|_, h| h.2 > now);
        }
        self.held
            .get(id)
            .is_some_and(|h| h.2 > now && (&h.1 != def || h.0 != service))
    }

    fn cursor_record(&self) -> Record {
        upsert(CURSOR.to_vec(), self.cursor.to_le_bytes().to_vec())
    }

    /// Appends the batch's records, only the last of each saga.
    async fn save(&mut self, work: &mut Work) -> Result<()> {
        let records = std::mem::take(&mut work.records);
        let mut last: HashMap<bytes::Bytes, usize> = HashMap::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            last.insert(r.key.clone().unwrap_or_default(), i);
        }
        let kept: Vec<Record> = records
            .into_iter()
            .enumerate()
            .filter(|(i, r)| last.get(&r.key.clone().unwrap_or_default()) == Some(i))
            .map(|(_, r)| r)
            .collect();
        for chunk in crate::statelog::chunks(kept) {
            self.log.append(chunk).await?;
        }
        Ok(())
    }

    fn list(&self, list: List) {
        let mut all: Vec<&Entry> = self
            .sagas
            .values()
            .filter(|e| list.status.is_none_or(|s| e.saga.status() == s))
            .collect();
        all.sort_by(|a, b| {
            let key = |e: &Entry| (e.saga.record().started_ms, e.saga.record().id.clone());
            key(b).cmp(&key(a))
        });
        let found = all
            .into_iter()
            .take(list.limit)
            .map(|e| to_wire(&e.service, &e.saga, false))
            .collect();
        let _ = list.reply.send(found);
    }

    /// Sends the calls and the answers of a batch that is saved.
    fn perform(&mut self, work: Work) {
        for list in work.lists {
            self.list(list);
        }
        for (reply, id) in work.replies {
            let answer = match self.sagas.get(&id) {
                Some(e) => Ok(to_wire(&e.service, &e.saga, true)),
                None => Err(Error::NotFound {
                    what: "saga",
                    name: id,
                }),
            };
            let _ = reply.send(answer);
        }
        for (id, c) in work.calls {
            let Some(e) = self.sagas.get(&id) else {
                continue;
            };
            let b = &e.saga.definition().branches[c.branch as usize];
            let operation = match c.op {
                Op::Action => b.action.clone(),
                Op::Compensation => b.compensation.clone(),
            };
            let timeout_ms = u64::try_from(c.deadline_ms.saturating_sub(now_ms())).unwrap_or(0);
            let req = pb::BranchCall {
                saga_started_ms: e.saga.record().started_ms,
                saga_service: e.service.clone(),
                call_id: 0,
                saga_id: id.clone(),
                branch: b.name.clone(),
                op: match c.op {
                    Op::Action => pb::BranchOp::Action,
                    Op::Compensation => pb::BranchOp::Compensation,
                } as i32,
                operation,
                payload: b.payload.clone(),
                attempt: c.call,
                timeout_ms,
            };
            let (service, sessions, tx) =
                (b.service.clone(), self.sessions.clone(), self.tx.clone());
            tracing::debug!(saga = %id, branch = %b.name, op = ?c.op, call = c.call, "calling a branch");
            self.calls.spawn(async move {
                // Answered by the deadline, with why when there is no
                // answer; the saga's own clock is a backstop behind it.
                let timeout = Duration::from_millis(timeout_ms);
                let outcome = match sessions.branch(&service, req, timeout).await {
                    BranchReply::Answered(r) => match pb::BranchOutcome::try_from(r.outcome) {
                        Ok(pb::BranchOutcome::Succeeded) => Outcome::Succeeded,
                        Ok(pb::BranchOutcome::Failed) => Outcome::Failed(r.reason),
                        _ => Outcome::Unknown(r.reason),
                    },
                    BranchReply::NoSession => Outcome::NotDelivered(format!(
                        "no sidecar of service {service:?} took the call within {timeout_ms} ms"
                    )),
                    BranchReply::NoAnswer => Outcome::Unknown(format!(
                        "no answer from a sidecar of service {service:?} within {timeout_ms} ms"
                    )),
                };
                let answer = Command::Answer {
                    id,
                    branch: c.branch,
                    op: c.op,
                    call: c.call,
                    outcome,
                };
                let _ = tx.send(answer).await;
            });
        }
    }
}

/// Reads committed starts from `__sagas`, from `from` on, into the driver;
/// a read that fails is tried again, with backoff.
async fn tail<L: Log>(data: L, mut from: u64, tx: mpsc::Sender<Command>) {
    use prost::Message;
    let tp = tandem_storage::TopicPartition::new(SAGA_TOPIC, 0);
    let mut pause = Duration::from_millis(100);
    loop {
        let read = async {
            data.wait_for(&tp, from).await?;
            data.read(&tp, from, tandem_storage::ReadBudget::default())
                .await
        };
        let batch = match read.await {
            Ok(b) => {
                pause = Duration::from_millis(100);
                b
            }
            Err(tandem_storage::Error::OffsetOutOfRange { .. })
                if data.offsets(&tp).is_ok_and(|o| o.log_start > from) =>
            {
                let start = data.offsets(&tp).map_or(from, |o| o.log_start);
                tracing::error!(
                    from,
                    start,
                    "{SAGA_TOPIC} was cut by retention before its sagas started: skipping ahead"
                );
                from = start;
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in_ms = pause.as_millis() as u64, "cannot read {SAGA_TOPIC}: sagas begun with a transaction wait");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        for r in batch {
            from = r.offset + 1;
            match pb::StartSagaRequest::decode(&r.record.value[..]) {
                Ok(req) => {
                    let cmd = Command::Logged {
                        offset: r.offset,
                        req,
                    };
                    if tx.send(cmd).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(offset = r.offset, error = %e, "undecodable saga start in {SAGA_TOPIC}: skipped");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use tandem_storage::{EmbeddedLog, LogConfig, TopicPartition};

    use super::*;

    fn start(id: &str) -> Record {
        let branch = pb::SagaBranch {
            name: "b".into(),
            service: "nobody".into(),
            action: "do".into(),
            compensation: "undo".into(),
            // Nobody takes the calls: they are retried, each retry a record.
            max_attempts: 1000,
            timeout_ms: 20,
            initial_backoff_ms: 10,
            max_backoff_ms: 20,
            ..Default::default()
        };
        let req = pb::StartSagaRequest {
            saga_id: id.into(),
            service: "orders".into(),
            definition: Some(pb::SagaDefinition {
                branches: vec![branch],
                concurrent: false,
                timeout_ms: 0,
            }),
        };
        upsert(id.as_bytes().to_vec(), req.encode_to_vec())
    }

    /// Compaction drops old segments of `__saga_state`; the `__sagas`
    /// cursor must survive it, or a restart would start again every saga
    /// begun with a transaction that was forgotten meanwhile.
    #[tokio::test]
    async fn compaction_keeps_the_cursor_of_committed_starts() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Internal(e.to_string()))?;
        let small = LogConfig {
            segment_bytes: 4096,
            ..LogConfig::default()
        };
        let data = EmbeddedLog::open(dir.path().join("d"), small.clone()).await?;
        let internal = EmbeddedLog::open(dir.path().join("i"), small).await?;
        let tp = TopicPartition::new(SAGA_TOPIC, 0);
        data.create_partition(&tp).await?;
        data.append(&tp, (0..3).map(|i| start(&format!("s{i}"))).collect())
            .await?;
        let (stop, stopped) = watch::channel(false);
        let (sagas, task) = Sagas::open_with(
            data.clone(),
            internal.clone(),
            Arc::new(Sessions::default()),
            Duration::from_secs(3600),
            1,
            stopped,
        )
        .await?;
        let state = TopicPartition::new(LOG, 0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while internal.offsets(&state)?.log_start == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never compacted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(sagas.get("s2".into()).await.is_ok());
        stop.send_replace(true);
        let _ = task.await;
        let (_, records) = StateLog::open(internal.clone(), LOG, 1).await?;
        let cursor = records
            .iter()
            .rev()
            .find(|r| r.record.key.as_deref() == Some(CURSOR))
            .map(|r| r.record.value.to_vec());
        assert_eq!(cursor, Some(3u64.to_le_bytes().to_vec()));
        Ok(())
    }
}
