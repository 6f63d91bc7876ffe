//! Consumer-group sessions: the async shell around [`GroupState`].
//!
//! One session per `Consume` stream. The member's partitions each have a
//! *lease* (partition, epoch) and a pump task that follows the partition's
//! tail and sends deliveries while the member has credit. Acks remove
//! offsets from the lease's pending set and commit the first offset not yet
//! acknowledged. A revoked lease stops its pump and is released once its
//! pending set drains or the member sends `Release` (or the member is
//! expelled after its revoke timeout); a member that leaves or dies loses
//! its leases at once, and what it had not acknowledged is delivered again
//! to the next holder.
//!
//! Credit: a delivery takes one unit of the member's credit when it is
//! handed to the stream; credit taken for records that are not handed over
//! (nothing to read, the lease stopped, the stream closed) goes back on
//! every path, so a member can never sit at zero credit with nothing
//! outstanding.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tandem_proto::coordinator as pb;
use tandem_storage::{Error as StorageError, Log, ReadBudget, StoredRecord, TopicPartition};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tonic::Status;

use crate::error::{Error, Result};
use crate::group::{Effect, Event, GroupState};
use crate::offsets::{GroupPartition, Offsets};
use crate::wire::headers_to_wire;

/// Most messages in one `Deliveries` response.
const MAX_DELIVERY_BATCH: usize = 1000;
/// Most credit a member may hold.
const MAX_CREDIT: u64 = 1 << 20;
/// Control messages (assignments) queued for a member before it is
/// expelled for not reading them.
const CONTROL_QUEUE: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

type Item = Result<pb::ConsumeResponse, Status>;

/// Where a partition without a committed offset starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartFrom {
    /// The oldest offset still stored.
    Earliest,
    /// The high-water mark when the partition is first assigned.
    Latest,
}

/// A checked subscription.
#[derive(Clone, Debug)]
pub struct Subscription {
    /// Topic to consume.
    pub topic: String,
    /// Consumer group.
    pub group: String,
    /// Start for partitions with no committed offset.
    pub start_from: StartFrom,
    /// Deliveries allowed before more credit arrives.
    pub initial_credit: u32,
    /// Expel the member after this long without a request.
    pub session_timeout: Duration,
    /// Name for logs and the member id.
    pub client_id: String,
    /// How long the member may take to finish with a revoked partition
    /// (`None`: the coordinator's setting).
    pub revoke_timeout: Option<Duration>,
}

#[derive(Default)]
struct LeaseState {
    /// Delivered, not yet acknowledged.
    pending: BTreeSet<u64>,
    /// Next offset to deliver.
    next: u64,
}

impl LeaseState {
    /// The first offset not acknowledged: what to commit.
    fn commit_point(&self) -> u64 {
        self.pending.first().copied().unwrap_or(self.next)
    }
}

struct Lease {
    gp: GroupPartition,
    epoch: u64,
    /// Where this holding started delivering.
    start: u64,
    state: Mutex<LeaseState>,
    /// The member said it is done with this revoked lease.
    released: std::sync::atomic::AtomicBool,
    stop: watch::Sender<bool>,
    drained: Notify,
    pump: Mutex<Option<JoinHandle<()>>>,
}

impl Lease {
    fn state(&self) -> MutexGuard<'_, LeaseState> {
        lock(&self.state)
    }

    fn revoking(&self) -> bool {
        *self.stop.borrow()
    }

    /// Stops the pump and waits for it: it watches `stop` at every wait,
    /// so it ends at its next step and returns the credit it holds.
    async fn stop_pump(&self) {
        let _ = self.stop.send(true);
        let pump = lock(&self.pump).take();
        if let Some(p) = pump {
            let _ = p.await;
        }
    }

    fn finished(&self) -> bool {
        self.released.load(Ordering::Acquire) || self.state().pending.is_empty()
    }
}

struct Member {
    id: String,
    sub: Subscription,
    credit: Semaphore,
    granted: AtomicU64,
    data: mpsc::Sender<Item>,
    control: mpsc::Sender<Item>,
    leases: Mutex<BTreeMap<u32, Arc<Lease>>>,
    expel: watch::Sender<Option<Status>>,
}

impl Member {
    fn expel(&self, status: Status) {
        self.expel.send_replace(Some(status));
    }

    fn add_credit(&self, n: u64) {
        let n = n.min(MAX_CREDIT.saturating_sub(self.credit.available_permits() as u64));
        self.credit.add_permits(n as usize);
        self.granted.fetch_add(n, Ordering::Relaxed);
    }

    fn send_assignment(&self) {
        let partitions = lock(&self.leases)
            .values()
            .filter(|l| !l.revoking())
            .map(|l| pb::AssignedPartition {
                partition: l.gp.partition,
                epoch: l.epoch,
            })
            .collect();
        let sent = self.control.try_send(Ok(pb::ConsumeResponse {
            kind: Some(pb::consume_response::Kind::Assignment(pb::Assignment {
                member_id: self.id.clone(),
                partitions,
            })),
        }));
        if let Err(mpsc::error::TrySendError::Full(_)) = sent {
            self.expel(Status::resource_exhausted(
                "the member does not read its assignments",
            ));
        }
    }
}

struct GroupInner {
    state: GroupState,
    members: HashMap<String, Arc<Member>>,
}

struct Group {
    group: String,
    topic: String,
    inner: tokio::sync::Mutex<GroupInner>,
}

/// Every consumer group's live sessions.
pub(crate) struct Groups<L> {
    log: L,
    offsets: Arc<Offsets>,
    revoke_timeout: Duration,
    groups: Mutex<HashMap<(String, String), Arc<Group>>>,
    /// Partition counts of topics grown while this broker ran: a group
    /// created by a session that read the count before the growth gets the
    /// new one.
    grown: Mutex<HashMap<String, u32>>,
    /// Topics being deleted: nobody joins their groups.
    closing: Mutex<std::collections::HashSet<String>>,
    next_member: AtomicU64,
    shutdown: watch::Receiver<bool>,
    /// Sessions still running.
    active: watch::Sender<usize>,
}

/// The response stream of a session: control messages (assignments, the
/// final status) first, then deliveries.
pub struct Outbound {
    control: mpsc::Receiver<Item>,
    data: mpsc::Receiver<Item>,
    control_open: bool,
    data_open: bool,
}

impl tokio_stream::Stream for Outbound {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        if self.control_open {
            match self.control.poll_recv(cx) {
                Poll::Ready(Some(item)) => return Poll::Ready(Some(item)),
                Poll::Ready(None) => self.control_open = false,
                Poll::Pending => {}
            }
        }
        if self.data_open {
            match self.data.poll_recv(cx) {
                Poll::Ready(Some(item)) => return Poll::Ready(Some(item)),
                Poll::Ready(None) => self.data_open = false,
                Poll::Pending => {}
            }
        }
        if self.control_open || self.data_open {
            Poll::Pending
        } else {
            Poll::Ready(None)
        }
    }
}

impl<L: Log + Clone> Groups<L> {
    pub(crate) fn new(
        log: L,
        offsets: Arc<Offsets>,
        revoke_timeout: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Groups {
            log,
            offsets,
            revoke_timeout,
            groups: Mutex::new(HashMap::new()),
            grown: Mutex::new(HashMap::new()),
            closing: Mutex::new(std::collections::HashSet::new()),
            next_member: AtomicU64::new(1),
            shutdown,
            active: watch::Sender::new(0),
        }
    }

    fn group(&self, group: &str, topic: &str, partitions: u32) -> Arc<Group> {
        let mut groups = lock(&self.groups);
        // Read with the map held: `grow` records the count before it looks
        // at the map, so a group is either created with the new count or
        // found by `grow`.
        let partitions = lock(&self.grown)
            .get(topic)
            .map_or(partitions, |&n| n.max(partitions));
        groups
            .entry((group.to_owned(), topic.to_owned()))
            .or_insert_with(|| {
                Arc::new(Group {
                    group: group.to_owned(),
                    topic: topic.to_owned(),
                    inner: tokio::sync::Mutex::new(GroupInner {
                        state: GroupState::new(partitions),
                        members: HashMap::new(),
                    }),
                })
            })
            .clone()
    }

    /// Live members of every group, by (topic, group), without waiting:
    /// a group busy at this instant (a member joining or leaving) is left
    /// out (a metrics scrape must not wait behind a rebalance).
    pub(crate) fn member_counts(&self) -> BTreeMap<(String, String), usize> {
        let groups: Vec<_> = lock(&self.groups).values().cloned().collect();
        groups
            .iter()
            .filter_map(|g| {
                let inner = g.inner.try_lock().ok()?;
                Some(((g.topic.clone(), g.group.clone()), inner.members.len()))
            })
            .collect()
    }

    /// `topic` has `partitions` partitions now (more than before): every
    /// live group of it hands the new ones out.
    pub(crate) async fn grow(self: &Arc<Self>, topic: &str, partitions: u32) {
        lock(&self.grown)
            .entry(topic.to_owned())
            .and_modify(|n| *n = (*n).max(partitions))
            .or_insert(partitions);
        let groups: Vec<_> = lock(&self.groups)
            .values()
            .filter(|g| g.topic == topic)
            .cloned()
            .collect();
        for g in groups {
            let mut inner = g.inner.lock().await;
            let effects = inner.state.apply(Event::Grown(partitions));
            self.execute(&g, &mut inner, effects);
        }
    }

    /// Refuses joins to `topic`'s groups from now on (it is being
    /// deleted), until [`Groups::reopen`]; a join under way is either seen
    /// by a later [`Groups::members_of`] or refused.
    pub(crate) fn close_topic(&self, topic: &str) {
        lock(&self.closing).insert(topic.to_owned());
    }

    /// Takes joins to `topic` again, and forgets what was known of it (a
    /// topic created with the name is new).
    pub(crate) fn reopen(&self, topic: &str, deleted: bool) {
        lock(&self.closing).remove(topic);
        if deleted {
            lock(&self.grown).remove(topic);
        }
    }

    /// Runs `f` while `group` has no member on `topic` and none can join
    /// (a joiner waits for the group's lock); FAILED_PRECONDITION naming
    /// the members when it has some.
    pub(crate) async fn without_members<T>(
        &self,
        group: &str,
        topic: &str,
        partitions: u32,
        f: impl FnOnce() -> T,
    ) -> Result<T> {
        loop {
            let g = self.group(group, topic, partitions);
            let inner = g.inner.lock().await;
            if !self.is_current(&g) {
                continue; // its last member left meanwhile: look again
            }
            if !inner.members.is_empty() {
                let mut ids: Vec<&str> = inner.members.keys().map(String::as_str).collect();
                ids.sort_unstable();
                return Err(Error::FailedPrecondition(format!(
                    "group {group:?} has {} member(s) on topic {topic:?} ({}): stop its consumers first",
                    ids.len(),
                    ids.join(", ")
                )));
            }
            let out = f();
            // The map holds live groups only: the entry looked up here goes.
            let mut groups = lock(&self.groups);
            let key = (g.group.clone(), g.topic.clone());
            if groups.get(&key).is_some_and(|x| Arc::ptr_eq(x, &g)) {
                groups.remove(&key);
            }
            return Ok(out);
        }
    }

    /// Live members per group consuming `topic`.
    pub(crate) async fn members_of(
        &self,
        topic: &str,
    ) -> BTreeMap<String, Vec<crate::broker::MemberDescription>> {
        let groups: Vec<_> = lock(&self.groups)
            .values()
            .filter(|g| g.topic == topic)
            .cloned()
            .collect();
        let mut out = BTreeMap::new();
        for g in groups {
            let inner = g.inner.lock().await;
            let mut members: Vec<_> = inner
                .members
                .values()
                .map(|m| crate::broker::MemberDescription {
                    id: m.id.clone(),
                    credit: m.credit.available_permits() as u64,
                    partitions: lock(&m.leases)
                        .values()
                        .filter(|l| !l.revoking())
                        .map(|l| l.gp.partition)
                        .collect(),
                })
                .collect();
            members.sort_by(|a, b| a.id.cmp(&b.id));
            out.insert(g.group.clone(), members);
        }
        out
    }

    /// Starts a session for `sub` on a topic of `partitions` partitions,
    /// reading further requests from `requests`; returns the response stream.
    pub(crate) fn start_session(
        self: &Arc<Self>,
        sub: Subscription,
        partitions: u32,
        requests: tonic::Streaming<pb::ConsumeRequest>,
    ) -> Outbound {
        let (data, data_rx) = mpsc::channel(64);
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let n = self.next_member.fetch_add(1, Ordering::Relaxed);
        let member = Arc::new(Member {
            id: format!("{}-{n}", sub.client_id),
            credit: Semaphore::new(0),
            granted: AtomicU64::new(0),
            data,
            control,
            leases: Mutex::new(BTreeMap::new()),
            expel: watch::Sender::new(None),
            sub,
        });
        member.add_credit(u64::from(member.sub.initial_credit));
        self.active.send_modify(|n| *n += 1);
        let this = self.clone();
        tokio::spawn(async move {
            this.run_session(partitions, member, requests).await;
            this.active.send_modify(|n| *n -= 1);
        });
        Outbound {
            control: control_rx,
            data: data_rx,
            control_open: true,
            data_open: true,
        }
    }

    /// Waits until every session has ended (after shutdown was signalled),
    /// at most `limit`.
    pub(crate) async fn sessions_ended(&self, limit: Duration) {
        let mut rx = self.active.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|n| *n == 0)).await;
    }

    /// True while `group` is the one in the map: a group whose last member
    /// left is removed (the map holds live groups only), and a joiner that
    /// raced with that removal looks the group up again.
    fn is_current(&self, group: &Arc<Group>) -> bool {
        lock(&self.groups)
            .get(&(group.group.clone(), group.topic.clone()))
            .is_some_and(|g| Arc::ptr_eq(g, group))
    }

    async fn run_session(
        self: &Arc<Self>,
        partitions: u32,
        member: Arc<Member>,
        mut requests: tonic::Streaming<pb::ConsumeRequest>,
    ) {
        let group = loop {
            let group = self.group(&member.sub.group, &member.sub.topic, partitions);
            let mut inner = group.inner.lock().await;
            if !self.is_current(&group) {
                continue;
            }
            if lock(&self.closing).contains(&member.sub.topic) {
                if inner.members.is_empty() {
                    let mut groups = lock(&self.groups);
                    let key = (group.group.clone(), group.topic.clone());
                    if groups.get(&key).is_some_and(|g| Arc::ptr_eq(g, &group)) {
                        groups.remove(&key);
                    }
                }
                drop(inner);
                let _ = member.control.try_send(Err(Status::not_found(format!(
                    "topic {:?} is being deleted",
                    member.sub.topic
                ))));
                return;
            }
            inner.members.insert(member.id.clone(), member.clone());
            let effects = inner.state.apply(Event::Join(member.id.clone()));
            self.execute(&group, &mut inner, effects);
            // Its first assignment goes with the group held, as every
            // assignment does: one built before a grant that another task
            // makes and sends meanwhile would arrive after it and take the
            // grant back in the member's eyes.
            member.send_assignment();
            drop(inner);
            break group;
        };
        tracing::info!(group = %group.group, topic = %group.topic, member = %member.id, "member joined");
        let mut expel = member.expel.subscribe();
        let mut shutdown = self.shutdown.clone();
        let timeout = member.sub.session_timeout;
        let ending: Option<Status> = loop {
            tokio::select! {
                r = tokio::time::timeout(timeout, requests.message()) => match r {
                    Err(_) => break Some(Status::deadline_exceeded(format!(
                        "no request within the session timeout of {} ms", timeout.as_millis()
                    ))),
                    Ok(Ok(Some(req))) => {
                        if let Err(status) = self.handle(&member, req) {
                            break Some(status);
                        }
                    }
                    Ok(Ok(None)) => break None,
                    Ok(Err(status)) => {
                        tracing::debug!(member = %member.id, %status, "consumer stream broke");
                        break Some(status);
                    }
                },
                _ = expel.changed() => {
                    break Some(expel.borrow().clone().unwrap_or_else(|| Status::aborted("expelled from the group")));
                }
                _ = shutdown.wait_for(|s| *s) => break Some(Status::unavailable("the coordinator stopped serving this topic's shard (shutting down, handing it to another replica, or no longer its lease holder)")),
            }
        };
        self.leave(&group, &member).await;
        if let Err(e) = self.offsets.flush().await {
            tracing::error!(error = %e, "flushing offsets at session end failed");
        }
        tracing::info!(group = %group.group, topic = %group.topic, member = %member.id, reason = ?ending.as_ref().map(Status::message), "member left");
        if let Some(status) = ending {
            let _ = member.control.try_send(Err(status));
        }
    }

    fn handle(&self, member: &Member, req: pb::ConsumeRequest) -> Result<(), Status> {
        use pb::consume_request::Kind;
        match req.kind {
            Some(Kind::Credit(c)) => member.add_credit(u64::from(c.messages)),
            Some(Kind::Ack(ack)) => {
                // Grouped by lease (a sidecar acks in the order its handlers
                // finish, partitions interleaved): each lease's acks take its
                // state once and commit once. Their order in the frame means
                // nothing: each removes an offset from the pending set, and
                // commits only move forward.
                let mut offsets = ack.offsets;
                offsets.sort_by_key(|a| (a.partition, a.epoch));
                for run in offsets.chunk_by(|a, b| a.partition == b.partition && a.epoch == b.epoch)
                {
                    self.ack(member, run);
                }
            }
            Some(Kind::Heartbeat(_)) => {}
            Some(Kind::Release(r)) => {
                let lease = lock(&member.leases)
                    .get(&r.partition)
                    .filter(|l| l.epoch == r.epoch && l.revoking())
                    .cloned();
                if let Some(lease) = lease {
                    lease.released.store(true, Ordering::Release);
                    lease.drained.notify_one();
                }
            }
            Some(Kind::Subscribe(_)) => {
                return Err(Error::invalid(
                    "subscribe",
                    "a session subscribes once, in its first request",
                )
                .into());
            }
            None => return Err(Error::invalid("kind", "empty request").into()),
        }
        Ok(())
    }

    /// Acks `run`, offsets of one partition and epoch (not empty).
    fn ack(&self, member: &Member, run: &[pb::AckedOffset]) {
        let (partition, epoch) = (run[0].partition, run[0].epoch);
        let lease = lock(&member.leases)
            .get(&partition)
            .filter(|l| l.epoch == epoch)
            .cloned();
        let Some(lease) = lease else {
            tracing::debug!(member = %member.id, partition, epoch, acks = run.len(), "acks for a lease the member no longer holds: ignored");
            return;
        };
        let (commit, empty) = {
            let mut s = lease.state();
            let mut any = false;
            for a in run {
                any |= s.pending.remove(&a.offset);
            }
            if !any {
                return;
            }
            (s.commit_point(), s.pending.is_empty())
        };
        self.offsets.commit(&lease.gp, commit);
        if empty && lease.revoking() {
            lease.drained.notify_one();
        }
    }

    /// Carries out the state machine's effects; the group lock is held.
    fn execute(self: &Arc<Self>, group: &Arc<Group>, inner: &mut GroupInner, effects: Vec<Effect>) {
        let mut touched: Vec<Arc<Member>> = Vec::new();
        for effect in effects {
            match effect {
                Effect::Grant {
                    member,
                    partition,
                    epoch,
                } => {
                    let Some(m) = inner.members.get(&member).cloned() else {
                        continue;
                    };
                    if let Err(e) = self.grant(group, &m, partition, epoch) {
                        m.expel(e.into());
                    }
                    touched.push(m);
                }
                Effect::Revoke {
                    member,
                    partition,
                    epoch,
                } => {
                    let Some(m) = inner.members.get(&member).cloned() else {
                        continue;
                    };
                    let lease = lock(&m.leases)
                        .get(&partition)
                        .filter(|l| l.epoch == epoch)
                        .cloned();
                    if let Some(lease) = lease {
                        let _ = lease.stop.send(true);
                        tokio::spawn(self.clone().drain(group.clone(), m.clone(), lease));
                    }
                    touched.push(m);
                }
            }
        }
        touched.sort_by(|a, b| a.id.cmp(&b.id));
        touched.dedup_by(|a, b| a.id == b.id);
        for m in touched {
            m.send_assignment();
        }
    }

    fn grant(
        self: &Arc<Self>,
        group: &Group,
        member: &Arc<Member>,
        partition: u32,
        epoch: u64,
    ) -> Result<()> {
        let tp = TopicPartition::new(group.topic.clone(), partition);
        let gp = GroupPartition {
            group: group.group.clone(),
            topic: group.topic.clone(),
            partition,
        };
        let offsets = self.log.offsets(&tp)?;
        let start = match (self.offsets.get(&gp), member.sub.start_from) {
            (Some(c), _) => c,
            (None, StartFrom::Earliest) => offsets.log_start,
            (None, StartFrom::Latest) => offsets.high_water_mark,
        };
        let committed = self.offsets.get(&gp);
        let start = start.clamp(offsets.log_start, offsets.high_water_mark);
        if committed.is_some_and(|c| c > start) {
            // The log is shorter than what the group had committed (records
            // acknowledged under fsync interval/never were lost in a crash,
            // or a failed sync cut them off): the offsets written from here
            // on must count, or later acks would be ignored below the stale
            // mark and the next holder would skip the new records.
            tracing::warn!(group = %gp.group, topic = %gp.topic, partition, committed = committed.unwrap_or_default(),
                high_water_mark = offsets.high_water_mark, "committed offset above the log's end: reset to it");
            self.offsets.reset(&gp, start);
        }
        // Acknowledged up to before the log start: retention removed what
        // the group had not consumed (said here, once: the holding starts
        // at the log start, and so does the group's offset from now on).
        let skipped = committed
            .filter(|&c| c < offsets.log_start)
            .map_or(0, |c| offsets.log_start - c);
        if skipped > 0 {
            tracing::warn!(group = %gp.group, topic = %gp.topic, partition, skipped,
                "retention removed messages the group had not consumed");
            // Said once: the next holder starts from what is stored.
            self.offsets.reset(&gp, start);
        }
        let (stop, stop_rx) = watch::channel(false);
        let lease = Arc::new(Lease {
            gp,
            epoch,
            start,
            state: Mutex::new(LeaseState {
                pending: BTreeSet::new(),
                next: start,
            }),
            released: std::sync::atomic::AtomicBool::new(false),
            stop,
            drained: Notify::new(),
            pump: Mutex::new(None),
        });
        // The member holds the lease before its pump starts: an ack of the
        // pump's first delivery may arrive at once, and an ack for a lease
        // not yet held would be dropped, leaving the lease a pending offset
        // that never drains (its next revoke would stall, then expel).
        lock(&member.leases).insert(partition, lease.clone());
        let pump = tokio::spawn(pump(
            self.log.clone(),
            tp,
            lease.clone(),
            member.clone(),
            stop_rx,
        ));
        *lock(&lease.pump) = Some(pump);
        tracing::debug!(group = %group.group, topic = %group.topic, member = %member.id, partition, epoch, start, "partition granted");
        Ok(())
    }

    /// Waits for a revoked lease to drain (or be released), then releases
    /// it; expels the member if it takes longer than its revoke timeout.
    async fn drain(self: Arc<Self>, group: Arc<Group>, member: Arc<Member>, lease: Arc<Lease>) {
        lease.stop_pump().await;
        let limit = member.sub.revoke_timeout.unwrap_or(self.revoke_timeout);
        let drained = tokio::time::timeout(limit, async {
            loop {
                let notified = lease.drained.notified();
                if lease.finished() {
                    return;
                }
                notified.await;
            }
        })
        .await
        .is_ok();
        let mut inner = group.inner.lock().await;
        if !inner.members.contains_key(&member.id) {
            return; // left meanwhile: its leave released everything
        }
        if !drained {
            member.expel(Status::aborted(format!(
                "partition {} was not acknowledged within the revoke timeout of {} ms",
                lease.gp.partition,
                limit.as_millis()
            )));
            return;
        }
        self.offsets.commit(&lease.gp, lease.state().commit_point());
        {
            let mut leases = lock(&member.leases);
            if leases
                .get(&lease.gp.partition)
                .is_some_and(|l| l.epoch == lease.epoch)
            {
                leases.remove(&lease.gp.partition);
            }
        }
        let effects = inner.state.apply(Event::Released {
            partition: lease.gp.partition,
            epoch: lease.epoch,
        });
        self.execute(&group, &mut inner, effects);
    }

    async fn leave(self: &Arc<Self>, group: &Arc<Group>, member: &Arc<Member>) {
        let mut inner = group.inner.lock().await;
        inner.members.remove(&member.id);
        let leases: Vec<_> = std::mem::take(&mut *lock(&member.leases))
            .into_values()
            .collect();
        for lease in leases {
            lease.stop_pump().await;
            self.offsets.commit(&lease.gp, lease.state().commit_point());
        }
        let effects = inner.state.apply(Event::Leave(member.id.clone()));
        self.execute(group, &mut inner, effects);
        if inner.members.is_empty() {
            let mut groups = lock(&self.groups);
            let key = (group.group.clone(), group.topic.clone());
            if groups.get(&key).is_some_and(|g| Arc::ptr_eq(g, group)) {
                groups.remove(&key);
            }
        }
    }
}

fn to_delivery(r: StoredRecord, partition: u32, epoch: u64, holding_start: u64) -> pb::Delivery {
    pb::Delivery {
        partition,
        offset: r.offset,
        epoch,
        timestamp_ms: r.record.timestamp_ms,
        message: Some(to_message(r.record)),
        holding_start,
        retention_skipped: 0,
    }
}

/// A stored record as consumers see it: without the transaction marker.
pub(crate) fn to_message(rec: tandem_storage::Record) -> pb::Message {
    pb::Message {
        id: String::from_utf8_lossy(&rec.id).into_owned(),
        key: rec.key,
        value: rec.value,
        headers: headers_to_wire(
            rec.headers
                .into_iter()
                .filter(|h| {
                    h.name != crate::transactions::MARKER_HEADER
                        && h.name != crate::published::CHOSEN_ID_HEADER
                })
                .collect(),
        ),
        partition: None,
    }
}

/// Credit taken from a member for a delivery in the making; what is not
/// handed over goes back when this is dropped, on every path (an early
/// return, an error, the task being stopped).
struct TakenCredit<'a> {
    credit: &'a Semaphore,
    n: usize,
}

impl TakenCredit<'_> {
    /// Gives back all but `keep` units now.
    fn keep(&mut self, keep: usize) {
        let back = self.n.saturating_sub(keep);
        self.credit.add_permits(back);
        self.n -= back;
    }

    /// The deliveries were handed over: their credit is spent.
    fn spend(mut self) {
        self.n = 0;
    }
}

impl Drop for TakenCredit<'_> {
    fn drop(&mut self) {
        if self.n > 0 {
            self.credit.add_permits(self.n);
        }
    }
}

/// Takes at least one unit of credit (waiting for it) and as much more as
/// is available, up to a batch.
async fn take_credit(credit: &Semaphore) -> Option<TakenCredit<'_>> {
    credit.acquire().await.ok()?.forget();
    let mut taken = TakenCredit { credit, n: 1 };
    let extra = credit.available_permits().min(MAX_DELIVERY_BATCH - 1);
    if extra > 0
        && let Ok(p) = credit.try_acquire_many(extra as u32)
    {
        p.forget();
        taken.n += extra;
    }
    Some(taken)
}

/// Follows one partition for one lease and sends what the member has
/// credit for, until `stop`.
async fn pump<L: Log>(
    log: L,
    tp: TopicPartition,
    lease: Arc<Lease>,
    member: Arc<Member>,
    mut stop: watch::Receiver<bool>,
) {
    // Offsets retention removed while this holding was reading, not yet
    // said with a delivery.
    let mut skipped = 0u64;
    let mut next = lease.state().next;
    loop {
        if *stop.borrow() {
            return;
        }
        let hwm = match log.offsets(&tp) {
            Ok(o) => o.high_water_mark,
            Err(e) => return member.expel(Error::from(e).into()),
        };
        if hwm <= next {
            tokio::select! {
                _ = stop.changed() => return,
                r = log.wait_for(&tp, next) => if let Err(e) = r {
                    // (the partition was deleted, or the log closed)
                    return member.expel(Error::from(e).into());
                },
            }
            continue;
        }
        let mut taken = tokio::select! {
            _ = stop.changed() => return,
            t = take_credit(&member.credit) => match t {
                Some(t) => t,
                None => return,
            },
        };
        let budget = ReadBudget {
            max_bytes: 1 << 20,
            max_records: taken.n,
        };
        let mut records = match log.read(&tp, next, budget).await {
            Ok(r) => r,
            Err(StorageError::OffsetOutOfRange { start, .. }) if next < start => {
                tracing::warn!(partition = %tp, from = next, to = start, "committed offset was removed by retention; skipping ahead");
                skipped += start - next;
                next = start;
                lease.state().next = start;
                continue;
            }
            Err(e) => return member.expel(Error::from(e).into()),
        };
        // A read that starts past `next` (PostgreSQL: retention deleted rows
        // under it) skipped what retention removed; anything else is a hole
        // the consumer is to see.
        if let Some(first) = records.first().map(|r| r.offset)
            && first > next
        {
            match log.offsets(&tp) {
                Ok(o) if o.log_start >= first => skipped += first - next,
                _ => {}
            }
        }
        if records.len() > 1 && tandem_storage::failpoint::error("coordinator.deliver.skip") {
            // A fault for the tests of loss detection: the first record of
            // a batch skipped, as a bug would skip it (and acknowledged
            // past with the rest).
            records.remove(0);
        }
        taken.keep(records.len());
        let Some(last) = records.last().map(|r| r.offset) else {
            continue;
        };
        let offsets: Vec<u64> = records.iter().map(|r| r.offset).collect();
        {
            let mut s = lease.state();
            s.pending.extend(offsets.iter().copied());
            s.next = last + 1;
        }
        let mut deliveries: Vec<pb::Delivery> = records
            .into_iter()
            .map(|r| to_delivery(r, tp.partition, lease.epoch, lease.start))
            .collect();
        deliveries[0].retention_skipped = skipped;
        let batch = pb::ConsumeResponse {
            kind: Some(pb::consume_response::Kind::Deliveries(pb::Deliveries {
                deliveries,
            })),
        };
        let sent = tokio::select! {
            _ = stop.changed() => false,
            r = member.data.send(Ok(batch)) => r.is_ok(),
        };
        if !sent {
            // Not handed over: these were never delivered, and their credit
            // goes back with `taken`.
            let mut s = lease.state();
            for o in &offsets {
                s.pending.remove(o);
            }
            s.next = offsets[0];
            return;
        }
        taken.spend();
        skipped = 0;
        next = last + 1;
    }
}
