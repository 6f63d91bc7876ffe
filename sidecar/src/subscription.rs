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
//! - Failure: a failing handler is retried with doubling delays; after
//!   `max_attempts` failures the message goes to `<topic>.dlq` with the error
//!   in the `tandem.error` header. An unreachable app is retried without
//!   limit (it is being restarted, not failing).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use tandem_coordinator::failpoint;
use tandem_proto::app as app_pb;
use tandem_proto::coordinator as pb;
use tandem_proto::sidecar as sc;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tonic::Code;

use crate::error::{Error, Result};
use crate::node::{Counters, Node, stopped};

const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
const UNREACHABLE_DELAY: Duration = Duration::from_secs(2);

/// Fills in defaults and checks a subscription request.
pub(crate) fn normalize(node: &Node, mut s: sc::SubscribeRequest) -> Result<sc::SubscribeRequest> {
    if s.topic.is_empty() {
        return Err(Error::invalid("topic", "is required"));
    }
    if s.group.is_empty() {
        s.group = node.config.service.clone();
    }
    if s.max_in_flight == 0 {
        s.max_in_flight = 32;
    }
    if s.max_in_flight > 10_000 {
        return Err(Error::invalid("max_in_flight", "must be at most 10000"));
    }
    if s.max_attempts == 0 {
        s.max_attempts = 5;
    }
    if s.retry_backoff_ms == 0 {
        s.retry_backoff_ms = 200;
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
    /// Starts (or restarts with new settings) a subscription.
    pub(crate) async fn start(&self, node: &Arc<Node>, spec: sc::SubscribeRequest) {
        let key = (spec.topic.clone(), spec.group.clone());
        self.stop(&key.0, &key.1).await;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(node.clone(), spec.clone(), stop_rx));
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

async fn run(node: Arc<Node>, spec: sc::SubscribeRequest, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match consume(&node, &spec, &mut stop).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(topic = %spec.topic, group = %spec.group, error = %e, "subscription stream lost; reconnecting")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stopped(&mut stop) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A finished delivery, to acknowledge.
struct Done {
    partition: u32,
    offset: u64,
    epoch: u64,
    key: Option<(u32, Bytes)>,
}

fn req(kind: pb::consume_request::Kind) -> pb::ConsumeRequest {
    pb::ConsumeRequest { kind: Some(kind) }
}

/// One consumer session: returns `Ok` when stopped, `Err` when the stream
/// broke.
async fn consume(
    node: &Arc<Node>,
    spec: &sc::SubscribeRequest,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let (tx, rx) = mpsc::channel(256);
    tx.send(req(pb::consume_request::Kind::Subscribe(pb::Subscribe {
        topic: spec.topic.clone(),
        group: spec.group.clone(),
        start_from: spec.start_from,
        initial_credit: spec.max_in_flight,
        session_timeout_ms: 10_000,
        client_id: node.config.instance.clone(),
    })))
    .await
    .map_err(|e| e.to_string())?;
    let mut stream = node
        .coordinator()
        .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    // keys being handled, with the deliveries waiting behind them
    let mut busy: HashMap<(u32, Bytes), VecDeque<pb::Delivery>> = HashMap::new();
    let mut outstanding = 0usize;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(3));
    let spec = Arc::new(spec.clone());
    // Handlers still running when this session ends are aborted with it:
    // what they had not finished is delivered again.
    let mut handlers = JoinSet::new();
    let start = |handlers: &mut JoinSet<()>, d: pb::Delivery| {
        let (node, spec, done_tx) = (node.clone(), spec.clone(), done_tx.clone());
        handlers.spawn(async move {
            let done = handle(&node, &spec, d).await;
            let _ = done_tx.send(done);
        });
    };
    let stopping = loop {
        tokio::select! {
            m = stream.message() => match m {
                Ok(Some(pb::ConsumeResponse { kind: Some(pb::consume_response::Kind::Deliveries(d)) })) => {
                    for delivery in d.deliveries {
                        Counters::bump(&node.counters.delivered);
                        outstanding += 1;
                        let key = delivery.message.as_ref().and_then(|m| m.key.clone()).map(|k| (delivery.partition, k));
                        match key {
                            Some(k) => match busy.get_mut(&k) {
                                Some(queue) => queue.push_back(delivery),
                                None => {
                                    busy.insert(k, VecDeque::new());
                                    start(&mut handlers, delivery);
                                }
                            },
                            None => start(&mut handlers, delivery),
                        }
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break Err("the coordinator ended the session".to_owned()),
                Err(s) => break Err(s.message().to_owned()),
            },
            Some(first) = done_rx.recv() => {
                let mut finished = vec![first];
                while let Ok(d) = done_rx.try_recv() {
                    finished.push(d);
                }
                outstanding -= finished.len();
                while handlers.try_join_next().is_some() {}
                acknowledge(&tx, &finished).await?;
                for d in finished {
                    let Some(k) = d.key else { continue };
                    match busy.get_mut(&k).and_then(VecDeque::pop_front) {
                        Some(next) => start(&mut handlers, next),
                        None => {
                            busy.remove(&k);
                        }
                    }
                }
            }
            _ = heartbeat.tick() => {
                tx.send(req(pb::consume_request::Kind::Heartbeat(pb::Heartbeat {}))).await.map_err(|e| e.to_string())?;
            }
            () = stopped(stop) => break Ok(()),
        }
    };
    stopping?;
    // Stopping: no new deliveries are started; what is being handled
    // finishes and is acknowledged; what waits behind a busy key is left to
    // be delivered again.
    let in_progress = outstanding - busy.values().map(VecDeque::len).sum::<usize>();
    let mut finished = Vec::new();
    let _ = tokio::time::timeout(node.config.handler_timeout, async {
        while finished.len() < in_progress {
            match done_rx.recv().await {
                Some(d) => finished.push(d),
                None => break,
            }
        }
    })
    .await;
    acknowledge(&tx, &finished).await?;
    drop(tx);
    // The coordinator commits the acknowledgements and ends the stream.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = stream.message().await {}
    })
    .await;
    Ok(())
}

async fn acknowledge(tx: &mpsc::Sender<pb::ConsumeRequest>, done: &[Done]) -> Result<(), String> {
    if done.is_empty() {
        return Ok(());
    }
    let offsets = done
        .iter()
        .map(|d| pb::AckedOffset {
            partition: d.partition,
            offset: d.offset,
            epoch: d.epoch,
        })
        .collect();
    tx.send(req(pb::consume_request::Kind::Ack(pb::Ack { offsets })))
        .await
        .map_err(|e| e.to_string())?;
    tx.send(req(pb::consume_request::Kind::Credit(pb::Credit {
        messages: done.len() as u32,
    })))
    .await
    .map_err(|e| e.to_string())
}

/// The app is restarting or gone, rather than failing the message.
fn unreachable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Cancelled | Code::Unknown
    )
}

/// Handles one delivery to the end: skipped as a duplicate, handled, or
/// dead-lettered.
async fn handle(node: &Node, spec: &sc::SubscribeRequest, d: pb::Delivery) -> Done {
    let message = d.message.clone().unwrap_or_default();
    let done = Done {
        partition: d.partition,
        offset: d.offset,
        epoch: d.epoch,
        key: message.key.clone().map(|k| (d.partition, k)),
    };
    let dedup = sc::DedupMode::try_from(spec.dedup).unwrap_or(sc::DedupMode::Sidecar);
    let dedup_on = dedup != sc::DedupMode::Off;
    if dedup_on && retry_db(|| node.db.inbox_has(&spec.group, &message.id)).await {
        Counters::bump(&node.counters.duplicates_skipped);
        tracing::debug!(group = %spec.group, id = %message.id, "duplicate skipped");
        return done;
    }
    let mut failures = 0u32;
    loop {
        let request = app_pb::HandleMessageRequest {
            topic: spec.topic.clone(),
            group: spec.group.clone(),
            partition: d.partition,
            offset: d.offset,
            message: Some(message.clone()),
            attempt: failures + 1,
            dedup: dedup
                .as_str_name()
                .trim_start_matches("DEDUP_MODE_")
                .to_owned(),
        };
        let outcome = match node.app("HandleMessage") {
            Ok(mut app) => {
                tokio::time::timeout(node.config.handler_timeout, app.handle_message(request))
                    .await
                    .unwrap_or_else(|_| {
                        Err(tonic::Status::deadline_exceeded(
                            "the handler did not answer within handler_timeout_ms",
                        ))
                    })
            }
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        match outcome {
            Ok(_) => {
                Counters::bump(&node.counters.handled);
                break;
            }
            Err(status) if unreachable(&status) => {
                tracing::debug!(id = %message.id, error = %status.message(), "app unreachable; retrying");
                tokio::time::sleep(UNREACHABLE_DELAY).await;
            }
            Err(status) => {
                Counters::bump(&node.counters.handler_failures);
                failures += 1;
                if failures >= spec.max_attempts {
                    let error = format!("{:?}: {}", status.code(), status.message());
                    dead_letter(node, spec, &d, message.clone(), failures, &error).await;
                    break;
                }
                let delay = Duration::from_millis(u64::from(spec.retry_backoff_ms))
                    .saturating_mul(1 << (failures - 1).min(16));
                tokio::time::sleep(delay.min(MAX_RETRY_DELAY)).await;
            }
        }
    }
    if dedup_on {
        retry_db(|| async {
            node.inbox
                .add(&spec.group, &message.id)
                .await
                .map(|()| true)
        })
        .await;
    }
    failpoint::hit("sidecar.consume.before_ack");
    done
}

/// Runs a database step until it succeeds (the database may be busy or
/// restarting); a message is never acknowledged on a guess.
async fn retry_db<F, Fut>(mut step: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let mut delay = Duration::from_millis(50);
    loop {
        match step().await {
            Ok(v) => return v,
            Err(e) => {
                tracing::warn!(error = %e, "dedup table unavailable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn dead_letter(
    node: &Node,
    spec: &sc::SubscribeRequest,
    d: &pb::Delivery,
    mut message: pb::Message,
    attempts: u32,
    error: &str,
) {
    let header = |name: &str, value: String| pb::Header {
        name: name.to_owned(),
        value: Bytes::from(value),
    };
    message.headers.extend([
        header("tandem.error", error.to_owned()),
        header("tandem.topic", spec.topic.clone()),
        header("tandem.group", spec.group.clone()),
        header("tandem.partition", d.partition.to_string()),
        header("tandem.offset", d.offset.to_string()),
        header("tandem.attempts", attempts.to_string()),
    ]);
    message.partition = None;
    let request = pb::PublishRequest {
        topic: format!("{}.dlq", spec.topic),
        messages: vec![message],
    };
    let mut delay = Duration::from_millis(100);
    loop {
        match node.coordinator().publish(request.clone()).await {
            Ok(_) => {
                Counters::bump(&node.counters.dead_lettered);
                tracing::warn!(topic = %spec.topic, group = %spec.group, offset = d.offset, %error, "message dead-lettered");
                return;
            }
            Err(s) => {
                tracing::warn!(error = %s.message(), "dead-lettering failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
