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
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::coordinators::Coordinators;
use crate::gather::{self, Gather, Limits};

/// Items per call, at most (the coordinator takes up to 4 096).
const MAX_ITEMS: usize = 512;

/// Calls in flight at once.
const IN_FLIGHT: usize = 2;

/// Encoded bytes per call, at most (a batch closes before it would pass
/// this; the gRPC limit is `MAX_REQUEST_BYTES`).
const MAX_BATCH_BYTES: usize = tandem_runtime::MAX_REQUEST_BYTES / 4;

/// How long a call may take before its items are sent again (a replica
/// that hangs must not hold every transaction of this sidecar).
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// An item's answer, with the ticket of the replica that gave it (see
/// [`Coordinators::pick`], for failover).
pub(crate) type Answer = (usize, Result<pb::transact_result::Kind, Status>);

type Pending = gather::Pending<pb::transact_item::Kind, Answer>;

/// Gathers items into calls.
#[derive(Debug)]
pub(crate) struct Batcher {
    gather: Gather<pb::transact_item::Kind, Answer>,
}

/// `call`, or UNAVAILABLE once it outlives [`CALL_TIMEOUT`] (its items
/// are then sent again).
async fn within<T>(
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(Status::unavailable(format!(
                "the coordinator did not answer within {} s",
                CALL_TIMEOUT.as_secs()
            )))
        })
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

/// Sends one batch on `client` and hands each item its answer (a single
/// item as its own call).
async fn send(
    mut client: CoordinatorClient<Channel>,
    index: usize,
    mut batch: Vec<Pending>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    if batch.len() == 1
        && let Some(p) = batch.pop()
    {
        let answer = within(unary(client, p.item)).await;
        drop(permit);
        let _ = p.reply.send((index, answer));
        return;
    }
    let (items, replies): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|p| (pb::TransactItem { kind: Some(p.item) }, p.reply))
        .unzip();
    let n = items.len();
    let answer = within(client.transact(pb::TransactRequest { items })).await;
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
        let limits = Limits {
            items: MAX_ITEMS,
            bytes: MAX_BATCH_BYTES,
            in_flight: IN_FLIGHT,
        };
        let gather = Gather::start(limits, encoded_len, move |batch, permit| {
            let (index, client) = coordinators.pick();
            tokio::spawn(send(client, index, batch, permit));
        });
        Batcher { gather }
    }

    /// Sends `item` in the next call; its answer, and the replica asked.
    pub(crate) async fn submit(&self, item: pb::transact_item::Kind) -> Answer {
        self.gather
            .submit(item)
            .await
            .unwrap_or_else(|| (0, Err(stopping())))
    }
}

/// Bytes `item` takes in a `Transact` call.
fn encoded_len(item: &pb::transact_item::Kind) -> usize {
    use pb::transact_item::Kind;
    use prost::Message;
    let body = match item {
        Kind::Prepare(p) => p.encoded_len(),
        Kind::Commit(e) | Kind::Rollback(e) => e.encoded_len(),
    };
    // The item's and the field's framing.
    body + 16
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
