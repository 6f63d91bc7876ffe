//! The app's concurrent Begin, Commit and Rollback calls gathered into
//! `Transact` calls to the coordinator, many items per call: while a call
//! is in flight (at most [`IN_FLIGHT`] at once), the items that arrive wait
//! for the next one, as the log's group commit gathers appends. Each item
//! keeps its own answer and status, and its own retries: an item refused as
//! UNAVAILABLE, or lost with its whole call, is sent again by its caller's
//! [`Coordinators::retrying`](crate::coordinators::Coordinators::retrying)
//! loop, which is safe for the same reasons as a single call's retry (a
//! prepare names its attempt, outcomes are idempotent).

use std::sync::Arc;

use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::coordinators::Coordinators;

/// Items per call, at most (the coordinator takes up to 4 096).
const MAX_ITEMS: usize = 512;

/// Calls in flight at once.
const IN_FLIGHT: usize = 2;

/// An item's answer, with the replica that gave it (for failover).
pub(crate) type Answer = (usize, Result<pb::transact_result::Kind, Status>);

struct Pending {
    item: pb::transact_item::Kind,
    reply: oneshot::Sender<Answer>,
}

/// Gathers items into calls.
#[derive(Debug)]
pub(crate) struct Batcher {
    tx: mpsc::Sender<Pending>,
}

fn stopping() -> Status {
    // Not a code that is retried: the caller gives up at once.
    Status::aborted("the sidecar is stopping")
}

/// An item's result as the answer of its own call.
fn answer_of(r: pb::TransactResult) -> Result<pb::transact_result::Kind, Status> {
    if r.code != Code::Ok as i32 {
        return Err(Status::new(Code::from_i32(r.code), r.message));
    }
    r.kind
        .ok_or_else(|| Status::internal("the coordinator answered an item with no result"))
}

/// Sends one batch on `client` and hands each item its answer.
async fn send(
    mut client: CoordinatorClient<Channel>,
    index: usize,
    batch: Vec<Pending>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (items, replies): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|p| (pb::TransactItem { kind: Some(p.item) }, p.reply))
        .unzip();
    let n = items.len();
    let answer = client.transact(pb::TransactRequest { items }).await;
    drop(permit);
    let results = match answer {
        Ok(r) if r.get_ref().results.len() == n => r.into_inner().results,
        Ok(r) => {
            let s = Status::internal(format!(
                "the coordinator answered {} of {n} items",
                r.get_ref().results.len()
            ));
            for reply in replies {
                let _ = reply.send((index, Err(s.clone())));
            }
            return;
        }
        Err(s) => {
            for reply in replies {
                let _ = reply.send((index, Err(s.clone())));
            }
            return;
        }
    };
    for (reply, result) in replies.into_iter().zip(results) {
        let _ = reply.send((index, answer_of(result)));
    }
}

impl Batcher {
    /// Starts gathering; the task ends when the batcher is dropped.
    pub(crate) fn start(coordinators: Arc<Coordinators>) -> Batcher {
        let (tx, mut rx) = mpsc::channel::<Pending>(8192);
        tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(IN_FLIGHT));
            while let Some(first) = rx.recv().await {
                // Items queue up while every call is in flight.
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let mut batch = vec![first];
                while batch.len() < MAX_ITEMS {
                    match rx.try_recv() {
                        Ok(p) => batch.push(p),
                        Err(_) => break,
                    }
                }
                let (index, client) = coordinators.pick();
                tokio::spawn(send(client, index, batch, permit));
            }
        });
        Batcher { tx }
    }

    /// Sends `item` in the next call; its answer, and the replica asked.
    pub(crate) async fn submit(&self, item: pb::transact_item::Kind) -> Answer {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Pending { item, reply }).await.is_err() {
            return (0, Err(stopping()));
        }
        rx.await.unwrap_or_else(|_| (0, Err(stopping())))
    }
}

/// The same item as a call of its own, for a coordinator that does not
/// know `Transact` (an older version during a rolling upgrade).
pub(crate) async fn unary(
    mut client: CoordinatorClient<Channel>,
    item: pb::transact_item::Kind,
) -> Result<pb::transact_result::Kind, Status> {
    use pb::transact_item::Kind;
    use pb::transact_result::Kind as Answer;
    Ok(match item {
        Kind::Prepare(p) => Answer::Prepare(client.prepare(p).await?.into_inner()),
        Kind::Commit(e) => Answer::End(client.commit(e).await?.into_inner()),
        Kind::Rollback(e) => Answer::End(client.rollback(e).await?.into_inner()),
    })
}
