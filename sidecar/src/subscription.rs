//! Subscriptions: the sidecar consumes a topic as a consumer-group member
//! and hands each message to the app's `HandleMessage`.
//!
//! - Idempotent effect: a message whose id is in `tandem_inbox` for the
//!   group is acknowledged without calling the app; after the handler
//!   succeeds the id is recorded (in STRONG mode the app has already recorded
//!   it in its own transaction), then the message is acknowledged. Delivery
//!   is at least once; this turns it into an effect exactly once.
//! - Order: messages with the same key (in one partition) are handled one at
//!   a time, in order; at most `max_in_flight` are outstanding at once, which
//!   is also the credit given to the coordinator.
//! - Failure: see `delivery.rs` (retries, dead letters, what counts as an
//!   unreachable app).
//! - Moving partitions: when the coordinator revokes a partition (another
//!   member joined), deliveries of it that have not started are dropped,
//!   those being handled are cancelled between steps, and once none is left
//!   the sidecar sends `Release`: whatever it did not acknowledge goes to the
//!   next holder. The member asks for a revoke timeout longer than its
//!   handler timeout, so a slow but legal handler is never expelled mid-call
//!   and its partition is never handled by two members at once.
//! - A session that breaks (coordinator gone, member expelled after a stall)
//!   never aborts a handler call in progress: it finishes and records its
//!   dedup row, and the redelivery is filtered.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use tandem_proto::coordinator as pb;
use tandem_proto::sidecar as sc;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::delivery::{self, Outcome};
use crate::error::{Error, Result};
use crate::handler::{self, Handler};
use crate::node::{Counters, Node, stopped};

/// Fills in defaults and checks a subscription request.
pub(crate) fn normalize(node: &Node, mut s: sc::SubscribeRequest) -> Result<sc::SubscribeRequest> {
    if s.topic.is_empty() {
        return Err(Error::invalid("topic", "is required"));
    }
    if s.group.is_empty() {
        s.group = node.config.service.clone();
    }
    // The coordinator's rule, checked here so that a subscription it would
    // refuse is never saved and retried for ever.
    tandem_runtime::check_group("group", &s.group).map_err(|e| Error::Coordinator(e.into()))?;
    if s.max_in_flight == 0 {
        s.max_in_flight = 32;
    }
    if s.max_in_flight > 10_000 {
        return Err(Error::invalid("max_in_flight", "must be at most 10000"));
    }
    if s.max_batch == 0 {
        s.max_batch = 1;
    }
    if s.max_batch > handler::MAX_BATCH {
        return Err(Error::invalid(
            "max_batch",
            format!("must be at most {}", handler::MAX_BATCH),
        ));
    }
    if s.max_batch > s.max_in_flight {
        return Err(Error::invalid(
            "max_batch",
            format!(
                "{} is more than max_in_flight ({}): a batch is made of the deliveries in flight at once",
                s.max_batch, s.max_in_flight
            ),
        ));
    }
    if s.max_attempts == 0 {
        s.max_attempts = 5;
    }
    if s.max_attempts > 1000 {
        return Err(Error::invalid("max_attempts", "must be at most 1000"));
    }
    if s.retry_backoff_ms == 0 {
        s.retry_backoff_ms = 200;
    }
    if s.retry_backoff_ms > 60_000 {
        return Err(Error::invalid(
            "retry_backoff_ms",
            "must be at most 60000 (retries back off up to 30 s anyway)",
        ));
    }
    if pb::StartFrom::try_from(s.start_from).is_err() {
        return Err(Error::invalid(
            "start_from",
            format!("unknown value {}", s.start_from),
        ));
    }
    if sc::DedupMode::try_from(s.dedup).is_err() {
        return Err(Error::invalid("dedup", format!("unknown mode {}", s.dedup)));
    }
    if s.dedup == sc::DedupMode::Unspecified as i32 {
        s.dedup = sc::DedupMode::Sidecar as i32;
    }
    Ok(s)
}

struct Runner {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The running subscriptions of a sidecar.
#[derive(Default)]
pub(crate) struct Subscriptions {
    runners: Mutex<HashMap<(String, String), Runner>>,
    specs: Mutex<HashMap<(String, String), sc::SubscribeRequest>>,
}

impl Subscriptions {
    /// The settings of the subscription of `group` to `topic` running now.
    pub(crate) fn current(&self, topic: &str, group: &str) -> Option<sc::SubscribeRequest> {
        self.specs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(topic.to_owned(), group.to_owned()))
            .cloned()
    }

    /// Starts (or restarts with new settings) a subscription; `first`
    /// hears how its first session opened: OK once the coordinator took
    /// it, or the coordinator's refusal when it may not consume so.
    pub(crate) async fn start(
        &self,
        node: &Arc<Node>,
        spec: sc::SubscribeRequest,
        first: Option<First>,
    ) {
        let key = (spec.topic.clone(), spec.group.clone());
        self.stop(&key.0, &key.1).await;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(node.clone(), spec.clone(), stop_rx, first));
        self.specs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone(), spec);
        self.runners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, Runner { stop, task });
    }

    /// Stops a subscription, letting handlers in flight finish.
    pub(crate) async fn stop(&self, topic: &str, group: &str) -> bool {
        let key = (topic.to_owned(), group.to_owned());
        self.specs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
        let runner = self
            .runners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
        match runner {
            Some(r) => {
                let _ = r.stop.send(true);
                let _ = r.task.await;
                true
            }
            None => false,
        }
    }

    /// Stops every subscription.
    pub(crate) async fn stop_all(&self) {
        let keys: Vec<_> = self
            .runners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        for (t, g) in keys {
            self.stop(&t, &g).await;
        }
    }

    pub(crate) fn list(&self) -> Vec<sc::SubscribeRequest> {
        let mut v: Vec<_> = self
            .specs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| (&a.topic, &a.group).cmp(&(&b.topic, &b.group)));
        v
    }
}

/// Encodes a subscription for `tandem_subscription`.
pub(crate) fn encode(spec: &sc::SubscribeRequest) -> Vec<u8> {
    spec.encode_to_vec()
}

/// Decodes a saved subscription.
pub(crate) fn decode(bytes: &[u8]) -> Option<sc::SubscribeRequest> {
    sc::SubscribeRequest::decode(bytes).ok()
}

/// Hears how a subscription's first session opened.
pub(crate) type First = tokio::sync::oneshot::Sender<std::result::Result<(), tonic::Status>>;

async fn run(
    node: Arc<Node>,
    spec: sc::SubscribeRequest,
    mut stop: watch::Receiver<bool>,
    mut first: Option<First>,
) {
    let mut backoff = Duration::from_millis(100);
    // One per subscription: its batches outlive a session's breaks.
    let handler = Arc::new(Handler::new(&node, &spec));
    loop {
        let mut opened = false;
        let mut refused = None;
        let ended = consume(
            &node,
            &handler,
            &spec,
            &mut stop,
            &mut opened,
            &mut refused,
            &mut first,
        )
        .await;
        match (ended, refused) {
            (Ok(()), _) => return,
            (Err(e), Some(_)) => {
                // Not this sidecar's to fix: said loudly, and tried again
                // slowly (the rules may change).
                tracing::error!(topic = %spec.topic, group = %spec.group, error = %e, "the coordinator refuses this subscription; trying again")
            }
            (Err(e), None) => {
                tracing::warn!(topic = %spec.topic, group = %spec.group, error = %e, "subscription session ended; reconnecting")
            }
        }
        if opened {
            // A session that was open ended (its shard moved, a replica
            // died): the next one is tried soon, not after the backoff
            // earlier failures built up.
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stopped(&mut stop) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One partition as held at one epoch.
type Lease = (u32, u64);

/// A finished delivery.
struct Done {
    lease: Lease,
    offset: u64,
    key: Option<(u32, Bytes)>,
    outcome: Outcome,
}

impl Done {
    /// Its acknowledgement, if it is to be acknowledged.
    fn ack(&self) -> Option<pb::AckedOffset> {
        (self.outcome == Outcome::Done).then_some(pb::AckedOffset {
            partition: self.lease.0,
            offset: self.offset,
            epoch: self.lease.1,
        })
    }
}

fn req(kind: pb::consume_request::Kind) -> pb::ConsumeRequest {
    pb::ConsumeRequest { kind: Some(kind) }
}

/// What one consumer session holds: its leases, the deliveries being
/// handled, and the ones waiting behind a busy key.
struct Session {
    node: Arc<Node>,
    handler: Arc<Handler>,
    spec: Arc<sc::SubscribeRequest>,
    tx: mpsc::Sender<pb::ConsumeRequest>,
    done_tx: mpsc::UnboundedSender<Done>,
    handlers: JoinSet<()>,
    /// The current assignment: partition → epoch.
    assigned: HashMap<u32, u64>,
    /// Leases revoked and not yet released, and released ones (deliveries
    /// of either that arrive late are dropped).
    revoked: HashSet<Lease>,
    released: HashSet<Lease>,
    /// Cancels the handlers of a lease (revocation, or the session stops).
    cancels: HashMap<Lease, watch::Sender<bool>>,
    /// Handlers running per lease.
    running: HashMap<Lease, usize>,
    /// Keys being handled, with the deliveries waiting behind them.
    busy: HashMap<(u32, Bytes), VecDeque<pb::Delivery>>,
    /// The next offset each lease should deliver (the sequence check).
    next: HashMap<Lease, u64>,
}

/// A session that ends (the coordinator went away, expelled this member,
/// or the subscription stops) cancels its handlers between steps but never
/// aborts a call in progress: the call runs to its end (at most the handler
/// timeout) and records its dedup row, so that the redelivery that follows
/// finds it. An aborted call would leave an effect without its record, and
/// the message would be handed to the app again.
impl Drop for Session {
    fn drop(&mut self) {
        for c in self.cancels.values() {
            let _ = c.send(true);
        }
        self.handlers.detach_all();
    }
}

impl Session {
    /// The lease was revoked (or already released): its deliveries are not
    /// handled here any more. A lease not yet named by an assignment is not
    /// gone: its deliveries can arrive before the assignment does.
    fn gone(&self, lease: Lease) -> bool {
        self.revoked.contains(&lease) || self.released.contains(&lease)
    }

    fn start(&mut self, d: pb::Delivery) {
        let lease = (d.partition, d.epoch);
        *self.running.entry(lease).or_default() += 1;
        let mut cancel = self
            .cancels
            .entry(lease)
            .or_insert_with(|| watch::channel(false).0)
            .subscribe();
        let (node, spec, done_tx) = (self.node.clone(), self.spec.clone(), self.done_tx.clone());
        let handler = self.handler.clone();
        let call = node.in_flight.enter();
        self.handlers.spawn(async move {
            let _call = call;
            let outcome = delivery::handle(&node, &handler, &spec, &d, &mut cancel).await;
            let _ = done_tx.send(Done {
                lease,
                offset: d.offset,
                key: d
                    .message
                    .as_ref()
                    .and_then(|m| m.key.clone())
                    .map(|k| (d.partition, k)),
                outcome,
            });
        });
    }

    /// Takes new deliveries: dropped if their lease is gone, queued behind
    /// their key if it is busy, started otherwise. Returns how many were
    /// dropped (their credit goes back).
    fn receive(&mut self, deliveries: Vec<pb::Delivery>) -> u32 {
        let mut dropped = 0;
        for d in deliveries {
            Counters::bump(&self.node.counters.delivered);
            let lease = (d.partition, d.epoch);
            if self.gone(lease) {
                dropped += 1;
                continue;
            }
            self.check_sequence(&d);
            let key = d
                .message
                .as_ref()
                .and_then(|m| m.key.clone())
                .map(|k| (d.partition, k));
            match key {
                Some(k) => match self.busy.get_mut(&k) {
                    Some(queue) => queue.push_back(d),
                    None => {
                        self.busy.insert(k, VecDeque::new());
                        self.start(d);
                    }
                },
                None => self.start(d),
            }
        }
        dropped
    }

    /// Checks that a lease's offsets are dense from where its holding
    /// started, in order (retention's skips, which the coordinator names,
    /// excepted): a hole is a message the coordinator did not deliver.
    fn check_sequence(&mut self, d: &pb::Delivery) {
        let counters = &self.node.counters;
        let expected = *self
            .next
            .entry((d.partition, d.epoch))
            .or_insert(d.holding_start);
        let expected = if d.retention_skipped > 0 {
            counters
                .retention_skipped
                .fetch_add(d.retention_skipped, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(topic = %self.spec.topic, group = %self.spec.group, partition = d.partition,
                skipped = d.retention_skipped, before = d.offset, "retention removed messages before they were delivered");
            expected.saturating_add(d.retention_skipped)
        } else {
            expected
        };
        if d.offset > expected {
            Counters::bump(&counters.sequence_gaps);
            counters
                .sequence_gap_messages
                .fetch_add(d.offset - expected, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(topic = %self.spec.topic, group = %self.spec.group, partition = d.partition,
                epoch = d.epoch, from = expected, to = d.offset - 1,
                "sequence gap: offsets missing from the deliveries");
        } else if d.offset < expected {
            tracing::warn!(topic = %self.spec.topic, group = %self.spec.group, partition = d.partition,
                epoch = d.epoch, offset = d.offset, expected, "offset delivered twice in one holding");
        }
        let next = self.next.entry((d.partition, d.epoch)).or_default();
        *next = (*next).max(d.offset + 1).max(expected);
    }

    /// A new assignment: leases no longer in it are revoked. Returns the
    /// number of waiting deliveries dropped.
    async fn assign(&mut self, a: pb::Assignment) -> Result<u32, String> {
        let now: HashMap<u32, u64> = a
            .partitions
            .iter()
            .map(|p| (p.partition, p.epoch))
            .collect();
        let gone: Vec<Lease> = self
            .assigned
            .iter()
            .filter(|(p, e)| now.get(p) != Some(e))
            .map(|(p, e)| (*p, *e))
            .collect();
        self.assigned = now;
        let mut dropped = 0;
        for lease in gone {
            tracing::info!(topic = %self.spec.topic, group = %self.spec.group, partition = lease.0, epoch = lease.1, "partition revoked");
            self.revoked.insert(lease);
            if let Some(c) = self.cancels.get(&lease) {
                let _ = c.send(true);
            }
            for (k, queue) in self.busy.iter_mut() {
                if k.0 == lease.0 {
                    dropped += queue.len() as u32;
                    queue.clear();
                }
            }
            self.release_if_idle(lease).await?;
        }
        Ok(dropped)
    }

    async fn release_if_idle(&mut self, lease: Lease) -> Result<(), String> {
        if !self.revoked.contains(&lease) || self.running.get(&lease).copied().unwrap_or(0) > 0 {
            return Ok(());
        }
        self.revoked.remove(&lease);
        self.cancels.remove(&lease);
        self.running.remove(&lease);
        self.next.remove(&lease);
        if self.released.len() > 4096 {
            self.released.clear();
        }
        self.released.insert(lease);
        self.tx
            .send(req(pb::consume_request::Kind::Release(pb::Release {
                partition: lease.0,
                epoch: lease.1,
            })))
            .await
            .map_err(|e| e.to_string())
    }

    /// Handles finished deliveries: acknowledges what is done, starts what
    /// waited behind their keys, releases revoked leases that became idle.
    async fn finish(&mut self, finished: Vec<Done>) -> Result<(), String> {
        let mut acks = Vec::new();
        let mut credit = finished.len() as u32;
        let mut stuck = None;
        let mut idle = Vec::new();
        for d in finished {
            if let Some(n) = self.running.get_mut(&d.lease) {
                *n -= 1;
                if *n == 0 {
                    idle.push(d.lease);
                }
            }
            acks.extend(d.ack());
            if let Outcome::Stuck(why) = d.outcome {
                stuck = Some(why);
            }
            let Some(k) = d.key else { continue };
            let next = if !self.gone(d.lease) {
                self.busy.get_mut(&k).and_then(VecDeque::pop_front)
            } else {
                None
            };
            match next {
                Some(next) if stuck.is_none() => self.start(next),
                Some(_) => credit += 1,
                None => {
                    if let Some(q) = self.busy.remove(&k) {
                        credit += q.len() as u32;
                    }
                }
            }
        }
        while self.handlers.try_join_next().is_some() {}
        if !acks.is_empty() {
            self.tx
                .send(req(pb::consume_request::Kind::Ack(pb::Ack {
                    offsets: acks,
                })))
                .await
                .map_err(|e| e.to_string())?;
        }
        if let Some(why) = stuck {
            // Not acknowledged: the next session gets it again, before its
            // key's successors.
            return Err(why);
        }
        self.grant(credit).await?;
        for lease in idle {
            self.release_if_idle(lease).await?;
        }
        Ok(())
    }

    async fn grant(&self, credit: u32) -> Result<(), String> {
        if credit == 0 {
            return Ok(());
        }
        self.tx
            .send(req(pb::consume_request::Kind::Credit(pb::Credit {
                messages: credit,
            })))
            .await
            .map_err(|e| e.to_string())
    }
}

/// One consumer session: returns `Ok` when stopped, `Err` when the stream
/// broke or a delivery got stuck.
async fn consume(
    node: &Arc<Node>,
    handler: &Arc<Handler>,
    spec: &sc::SubscribeRequest,
    stop: &mut watch::Receiver<bool>,
    opened: &mut bool,
    refused: &mut Option<tonic::Status>,
    first: &mut Option<First>,
) -> Result<(), String> {
    let subscribe = req(pb::consume_request::Kind::Subscribe(pb::Subscribe {
        topic: spec.topic.clone(),
        group: spec.group.clone(),
        start_from: spec.start_from,
        initial_credit: spec.max_in_flight,
        session_timeout_ms: 10_000,
        client_id: node.config.instance.clone(),
        revoke_timeout_ms: node.config.revoke_timeout().as_millis() as u32,
    }));
    // A replica that does not own the topic's shard names the one that
    // does: followed at once (a few times, while the shard moves).
    let mut hops = 0;
    let (tx, mut stream) = loop {
        let (tx, rx) = mpsc::channel(256);
        tx.send(subscribe.clone())
            .await
            .map_err(|e| e.to_string())?;
        let route = node.coordinators.route(&spec.topic);
        let answer = route
            .client
            .clone()
            .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        match answer {
            Ok(s) => break (tx, s.into_inner()),
            Err(s) => {
                let redirected = node
                    .coordinators
                    .route_failed(&spec.topic, &route, &s)
                    .await;
                if redirected && hops < 3 {
                    hops += 1;
                    tracing::info!(topic = %spec.topic, group = %spec.group, why = %s.message(), "subscription goes to the replica that owns its topic");
                    continue;
                }
                if matches!(
                    s.code(),
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                ) {
                    if let Some(f) = first.take() {
                        let _ = f.send(Err(s.clone()));
                    }
                    *refused = Some(s.clone());
                }
                return Err(s.message().to_owned());
            }
        }
    };
    *opened = true;
    if let Some(f) = first.take() {
        let _ = f.send(Ok(()));
    }
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut heartbeat = tokio::time::interval(Duration::from_secs(3));
    // Handlers still running when this value is dropped finish their call
    // in progress (see `Drop for Session`); what they had not acknowledged
    // is delivered again.
    let mut s = Session {
        node: node.clone(),
        handler: handler.clone(),
        spec: Arc::new(spec.clone()),
        tx,
        done_tx,
        handlers: JoinSet::new(),
        assigned: HashMap::new(),
        revoked: HashSet::new(),
        released: HashSet::new(),
        cancels: HashMap::new(),
        running: HashMap::new(),
        busy: HashMap::new(),
        next: HashMap::new(),
    };
    let stopping = loop {
        tokio::select! {
            m = stream.message() => match m {
                Ok(Some(pb::ConsumeResponse { kind: Some(pb::consume_response::Kind::Deliveries(d)) })) => {
                    let dropped = s.receive(d.deliveries);
                    s.grant(dropped).await?;
                }
                Ok(Some(pb::ConsumeResponse { kind: Some(pb::consume_response::Kind::Assignment(a)) })) => {
                    let dropped = s.assign(a).await?;
                    s.grant(dropped).await?;
                }
                Ok(Some(_)) => {}
                Ok(None) => break Err("the coordinator ended the session".to_owned()),
                Err(st) => break Err(st.message().to_owned()),
            },
            Some(first) = done_rx.recv() => {
                let mut finished = vec![first];
                while let Ok(d) = done_rx.try_recv() {
                    finished.push(d);
                }
                s.finish(finished).await?;
            }
            _ = heartbeat.tick() => {
                s.tx.send(req(pb::consume_request::Kind::Heartbeat(pb::Heartbeat {}))).await.map_err(|e| e.to_string())?;
            }
            () = stopped(stop) => break Ok(()),
        }
    };
    stopping?;
    // Stopping: nothing new starts; handlers between steps give up at once,
    // a call in progress finishes (at most the handler timeout) and is
    // acknowledged; what waits behind a busy key is delivered again later.
    for c in s.cancels.values() {
        let _ = c.send(true);
    }
    for q in s.busy.values_mut() {
        q.clear();
    }
    let mut acks = Vec::new();
    let _ = tokio::time::timeout(
        node.config.handler_timeout + Duration::from_secs(1),
        async {
            while !s.handlers.is_empty() {
                while let Ok(d) = done_rx.try_recv() {
                    acks.extend(d.ack());
                }
                if s.handlers.join_next().await.is_none() {
                    break;
                }
            }
        },
    )
    .await;
    while let Ok(d) = done_rx.try_recv() {
        acks.extend(d.ack());
    }
    if !acks.is_empty() {
        s.tx.send(req(pb::consume_request::Kind::Ack(pb::Ack {
            offsets: acks,
        })))
        .await
        .map_err(|e| e.to_string())?;
    }
    drop(s);
    // The coordinator commits the acknowledgements and ends the stream.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = stream.message().await {}
    })
    .await;
    Ok(())
}
