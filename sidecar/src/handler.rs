//! Calls of the app's message handler: one `HandleMessage` per message, or,
//! for a subscription whose `max_batch` is above 1, the messages ready at
//! once in one `HandleMessages` call, so that the app can apply them in one
//! database transaction.
//!
//! Each delivery still makes its own calls and gets its own result (see
//! `delivery.rs`): a batch is only how concurrent calls travel. A batch
//! never holds two messages of one key, because a key's next delivery
//! starts only after the previous one ended.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tandem_proto::app as app_pb;
use tandem_proto::sidecar as sc;
use tandem_runtime::telemetry;
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard, watch};
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::gather::{Gather, Limits, Pending};
use crate::node::Node;

/// Encoded bytes per `HandleMessages` call, at most: below the 4 MiB that
/// gRPC servers accept by default (a larger single message goes alone).
const MAX_BATCH_BYTES: usize = 3 << 20;

/// Most messages per call a subscription may ask for.
pub(crate) const MAX_BATCH: u32 = 4096;

/// Longest a message waits for a place in a call (while the calls allowed
/// at once are all in the app) before its delivery takes it back, renews
/// its claim and queues again: its claim must outlive the wait plus the
/// call, and its claim lives `handler_timeout` plus 15 s.
const MAX_QUEUED: Duration = Duration::from_secs(5);

type Answer = Result<(), Status>;

/// What became of a call of the app.
pub(crate) enum Called {
    /// The app answered (or the call failed).
    Answered(Answer),
    /// Taken back before it was sent (cancelled, or queued too long).
    Withdrawn,
}

const QUEUED: u8 = 0;
const SENT: u8 = 1;
const WITHDRAWN: u8 = 2;

/// A message waiting for a place in a call; its state is decided once,
/// sent or withdrawn, whichever comes first.
pub(crate) struct Queued {
    request: app_pb::HandleMessageRequest,
    state: Arc<AtomicU8>,
}

/// The handler calls of a sidecar's deliveries in its app (every
/// subscription's): when the app dies, every call in it breaks, and only a
/// call that was alone in it says which message killed it. Ordinary calls
/// share the app; a call of a message whose last call broke takes the app
/// to itself (the others wait until it ends).
#[derive(Debug, Default)]
pub(crate) struct Turns {
    exclusive: RwLock<()>,
    calls: Mutex<TurnCount>,
}

#[derive(Debug, Default)]
struct TurnCount {
    /// Calls in the app now.
    inside: usize,
    /// Calls ever begun.
    begun: u64,
}

/// One handler call's time in the app, until dropped.
pub(crate) struct Turn<'a> {
    turns: &'a Turns,
    _shared: Option<RwLockReadGuard<'a, ()>>,
    _exclusive: Option<RwLockWriteGuard<'a, ()>>,
    /// Its number among the calls begun.
    number: u64,
    /// No other call was in the app when it began.
    first_in: bool,
}

impl Turns {
    /// A turn in the app, shared with other calls or, `exclusive`, alone.
    pub(crate) async fn take(&self, exclusive: bool) -> Turn<'_> {
        let (shared, excl) = if exclusive {
            (None, Some(self.exclusive.write().await))
        } else {
            (Some(self.exclusive.read().await), None)
        };
        let mut c = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        let first_in = c.inside == 0;
        c.inside += 1;
        c.begun += 1;
        Turn {
            turns: self,
            _shared: shared,
            _exclusive: excl,
            number: c.begun,
            first_in,
        }
    }
}

impl Turn<'_> {
    /// No other handler call of this sidecar was in the app at any moment
    /// of this one so far.
    pub(crate) fn was_alone(&self) -> bool {
        let c = self
            .turns
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.first_in && c.begun == self.number
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut c = self
            .turns
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        c.inside -= 1;
    }
}

/// How a subscription calls its app.
pub(crate) enum Handler {
    /// `HandleMessage`, one message per call.
    One,
    /// `HandleMessages`, the calls in flight gathered.
    Batched(Gather<Queued, Answer>),
}

impl Handler {
    /// The handler of a subscription (its `max_batch` checked already).
    pub(crate) fn new(node: &Arc<Node>, spec: &sc::SubscribeRequest) -> Handler {
        if spec.max_batch <= 1 {
            return Handler::One;
        }
        let items = spec.max_batch as usize;
        // Enough calls at once that the deliveries in flight are never
        // held back by the batch size, and at least two, so that a batch
        // fills while the previous one is in the app.
        let in_flight = (spec.max_in_flight as usize).div_ceil(items).max(2);
        let limits = Limits {
            items,
            bytes: MAX_BATCH_BYTES,
            in_flight,
        };
        let node = node.clone();
        let size = |q: &Queued| prost::Message::encoded_len(&q.request) + 8;
        Handler::Batched(Gather::start(limits, size, move |batch, permit| {
            let node = node.clone();
            tokio::spawn(async move {
                send(&node, batch).await;
                drop(permit);
            });
        }))
    }

    /// Hands one message to the app. A batched handler sends it `alone`
    /// (a retry: a message that failed, or whose call failed, must not
    /// fail its batch-mates again), or in the next call, unless `cancel`
    /// fires or [`MAX_QUEUED`] passes before that call takes it.
    pub(crate) async fn call(
        &self,
        node: &Node,
        request: app_pb::HandleMessageRequest,
        alone: bool,
        cancel: &mut watch::Receiver<bool>,
    ) -> Called {
        let gather =
            match self {
                Handler::Batched(gather) if !alone => gather,
                Handler::Batched(_) => {
                    let mut answers = batch_call(node, vec![request]).await;
                    return Called::Answered(answers.pop().unwrap_or_else(|| {
                        Err(Status::internal("HandleMessages gave no answer"))
                    }));
                }
                Handler::One => return Called::Answered(one_call(node, request).await),
            };
        let state = Arc::new(AtomicU8::new(QUEUED));
        let withdraw = || {
            state
                .compare_exchange(QUEUED, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        };
        let submit = gather.submit(Queued {
            request,
            state: state.clone(),
        });
        tokio::pin!(submit);
        let queued_too_long = tokio::time::sleep(MAX_QUEUED);
        tokio::pin!(queued_too_long);
        let (mut cancel_seen, mut timer_seen) = (false, false);
        loop {
            tokio::select! {
                answer = &mut submit => {
                    return Called::Answered(
                        answer.unwrap_or_else(|| Err(Status::unavailable("the sidecar is stopping"))),
                    );
                }
                // Once sent, the call runs to its end and its answer is
                // awaited, as a single call's is.
                _ = cancel.wait_for(|c| *c), if !cancel_seen => {
                    cancel_seen = true;
                    if withdraw() {
                        return Called::Withdrawn;
                    }
                }
                () = &mut queued_too_long, if !timer_seen => {
                    timer_seen = true;
                    if withdraw() {
                        return Called::Withdrawn;
                    }
                }
            }
        }
    }
}

/// `HandleMessage` once, with the handler timeout as the call's deadline.
async fn one_call(node: &Node, request: app_pb::HandleMessageRequest) -> Answer {
    let mut app = node
        .app("HandleMessage")
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let limit = node.config.handler_timeout;
    // The app's call is a child of this delivery's span (or, with traces
    // off here, of the producer's, as the message says).
    let incoming = request.message.as_ref().and_then(|m| {
        telemetry::from_headers(
            m.headers
                .iter()
                .map(|h| (h.name.as_str(), h.value.as_ref())),
        )
    });
    let tp = telemetry::pass_on(&tracing::Span::current(), incoming.as_deref());
    let mut request = tonic::Request::new(request);
    request.set_timeout(limit);
    telemetry::to_metadata(request.metadata_mut(), tp.as_deref());
    timed(limit, async move {
        app.handle_message(request).await.map(|_| ())
    })
    .await
}

/// One `HandleMessages` call for the messages of `batch` still queued,
/// each answered with its own result; the withdrawn ones are left out.
async fn send(node: &Node, batch: Vec<Pending<Queued, Answer>>) {
    let (messages, replies): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .filter(|p| {
            p.item
                .state
                .compare_exchange(QUEUED, SENT, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
        .map(|p| (p.item.request, p.reply))
        .unzip();
    if messages.is_empty() {
        return;
    }
    let results = batch_call(node, messages).await;
    for (reply, result) in replies.into_iter().zip(results) {
        let _ = reply.send(result);
    }
}

/// `HandleMessages` once for `messages`: one answer per message.
async fn batch_call(node: &Node, messages: Vec<app_pb::HandleMessageRequest>) -> Vec<Answer> {
    let n = messages.len();
    let answer = match node.app("HandleMessages") {
        Err(e) => Err(Status::unavailable(e.to_string())),
        Ok(mut app) => {
            let limit = node.config.handler_timeout;
            let mut request = tonic::Request::new(app_pb::HandleMessagesRequest { messages });
            request.set_timeout(limit);
            timed(limit, async move {
                app.handle_messages(request)
                    .await
                    .map(|r| r.into_inner().results)
            })
            .await
        }
    };
    match answer {
        Ok(results) if results.is_empty() => (0..n).map(|_| Ok(())).collect(),
        Ok(results) if results.len() == n => results
            .into_iter()
            .map(|r| match Code::from_i32(r.code) {
                Code::Ok => Ok(()),
                code => Err(Status::new(code, r.message)),
            })
            .collect(),
        Ok(results) => {
            let s = Status::internal(format!(
                "HandleMessages answered {} results for {n} messages (one per message, or none)",
                results.len()
            ));
            (0..n).map(|_| Err(s.clone())).collect()
        }
        Err(s) => (0..n).map(|_| Err(s.clone())).collect(),
    }
}

/// Runs a call of the app with `limit` as its deadline: a call that
/// outlives it is a timed-out handler (an error of its own), not an
/// unreachable app.
async fn timed<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let started = Instant::now();
    let timed_out = || {
        Status::deadline_exceeded(format!(
            "the handler did not answer within handler_timeout_ms ({} ms)",
            limit.as_millis()
        ))
    };
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(v)) => Ok(v),
        // The client's own deadline surfaces as a cancelled call.
        Ok(Err(_)) if started.elapsed() >= limit => Err(timed_out()),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(timed_out()),
    }
}
