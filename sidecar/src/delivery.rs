//! One delivery, handled to the end: skipped as a duplicate, handled by the
//! app, dead-lettered, or abandoned to be delivered again.
//!
//! Contract:
//! - **Dedup key** `(group, topic, message id)`. Before *every* call of the
//!   app (the first and each retry) `tandem_inbox` is consulted, in every
//!   dedup mode but OFF: an id already there is acknowledged without calling
//!   the app. So a STRONG-mode app that committed its row and then became
//!   unreachable is not called again when it comes back.
//! - **One at a time per id**: within a sidecar, deliveries with the same
//!   dedup key wait for each other ([`Claims`]). In SIDECAR mode each
//!   attempt is also claimed in the database (`tandem_claim`, owner = this
//!   process: instance name and a per-process suffix, expiring `handler_timeout` + 15 s later): a second sidecar of
//!   the group holding the same message (its partition moved while the old
//!   holder still ran the handler, or one id on two partitions) waits for
//!   the claim to be released or to expire, then finds the dedup row. So
//!   check-then-record never lets two deliveries of one id reach the app at
//!   once. (STRONG mode needs no claim: the app's own insert of the dedup
//!   row is the atomic step.) The check and the claim are one database
//!   transaction, batched with other deliveries' by the sidecar's inbox
//!   writer.
//! - **Failures**: a transport failure (no gRPC status came from the app:
//!   connection refused or reset, which the client reports with an error
//!   source) or `UNAVAILABLE` means the app is not reachable: retried without
//!   limit and not counted. Every other status, `UNKNOWN` included (how
//!   Python, Java and Go servers report an uncaught exception), and a call
//!   that outlives `handler_timeout` count as a failed attempt; after
//!   `max_attempts` the message goes to `<topic>.dlq`. A call whose
//!   connection breaks mid-way (the app died during it) is not counted as
//!   a failure. From then on the message's calls have the app to
//!   themselves (the sidecar's other handler calls wait, see
//!   [`crate::handler::Turns`]), and after `max(max_attempts, 3)` breaks of
//!   calls that were alone in the app the message is taken for one that
//!   crashes the app and dead-lettered, so it cannot stall its key for
//!   ever. A break of a call that shared the app counts for none of the
//!   messages in it: any of them may have been the killer.
//! - **Dead letters** are published with a bounded number of retries; when
//!   that fails too the delivery is [`Outcome::Stuck`]: not acknowledged, and
//!   the session ends so that it comes again later, before its key's
//!   successors (order is never given up to make progress).
//! - **Redriven dead letters** (`tandem dlq redrive`) carry the group that
//!   gave them up in `tandem.redrive.group` and their topic in
//!   `tandem.redrive.topic`: on that topic only that group's sidecars call
//!   their app; the other groups' sidecars acknowledge them unhandled.
//! - **Cancellation** (the subscription stops, or the partition is revoked):
//!   a delivery between two steps is abandoned unacknowledged and delivered
//!   again to the partition's next holder.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tandem_proto::app as app_pb;
use tandem_proto::coordinator as pb;
use tandem_proto::sidecar as sc;
use tandem_runtime::telemetry;
use tandem_storage::failpoint;
use tokio::sync::{OwnedMutexGuard, watch};
use tonic::{Code, Status};
use tracing::Instrument;

use crate::db::{Admission, Admit, ClaimRequest, InboxRow};
use crate::error::Result;
use crate::handler::{Called, Handler};
use crate::node::{Counters, Node};

/// Names the only group that handles a message redriven from a dead-letter
/// topic to [`REDRIVE_TOPIC_HEADER`]; the topic's other groups acknowledge
/// it without calling their app.
pub const REDRIVE_GROUP_HEADER: &str = "tandem.redrive.group";
/// The topic a dead letter was redriven to: the group header counts there
/// only (not in a copy an app forwards elsewhere with its headers).
pub const REDRIVE_TOPIC_HEADER: &str = "tandem.redrive.topic";

const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
const UNREACHABLE_DELAY: Duration = Duration::from_secs(2);
/// Calls broken mid-way (the app's connection lost during the call) before
/// a message is taken for one that crashes the app (at least; more when
/// `max_attempts` is larger).
const MIN_CRASHES: u32 = 3;
/// Longest wait for a turn in the app (see [`crate::handler::Turns`])
/// after which a claimed message renews its claim before its call: the
/// claim lives `handler_timeout` + 15 s from its admission, and must
/// outlive this wait, the call's queueing (at most 5 s) and the call.
const MAX_TURN_WAIT: Duration = Duration::from_secs(5);
/// How often a message another sidecar has claimed is looked at again.
const CLAIM_POLL: Duration = Duration::from_millis(500);
/// Publish attempts of one dead letter before the delivery is stuck.
const DEAD_LETTER_ATTEMPTS: u32 = 5;
/// Longest `tandem.error` header kept (the app's message is cut there).
const MAX_ERROR_HEADER: usize = 1024;

/// How a delivery ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Handled, skipped as a duplicate, or dead-lettered: acknowledge it.
    Done,
    /// Cancelled before it was done: not acknowledged, delivered again.
    Abandoned,
    /// It failed for good and could not be dead-lettered: the session must
    /// end so it is delivered again (the reason is logged).
    Stuck(String),
}

/// Dedup keys being handled in this sidecar, so that two deliveries of one
/// id never run at once.
#[derive(Debug, Default)]
pub(crate) struct Claims {
    held: Mutex<HashMap<InboxRow, Arc<tokio::sync::Mutex<()>>>>,
}

/// A held claim; dropping it lets the next delivery of the id go.
pub(crate) struct Claim<'a> {
    claims: &'a Claims,
    row: InboxRow,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Claims {
    async fn claim(&self, row: InboxRow) -> Claim<'_> {
        let lock = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(row.clone())
            .or_default()
            .clone();
        let guard = lock.lock_owned().await;
        Claim {
            claims: self,
            row,
            guard: Some(guard),
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut held = self
            .claims
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        drop(self.guard.take());
        // Forget the key once nobody holds or waits for it: the map only
        // holds ids in flight.
        if held
            .get(&self.row)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            held.remove(&self.row);
        }
    }
}

/// The app did not answer with a status of its own: it is restarting or
/// gone, rather than failing the message.
pub(crate) fn unreachable(status: &Status) -> bool {
    status.code() == Code::Unavailable || std::error::Error::source(status).is_some()
}

/// Sleeps for `d` unless cancelled first; false when cancelled.
async fn pause(d: Duration, cancel: &mut watch::Receiver<bool>) -> bool {
    if *cancel.borrow() {
        return false;
    }
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        _ = cancel.wait_for(|c| *c) => false,
    }
}

/// Runs a database step until it succeeds (the database may be busy or
/// restarting), or `None` once cancelled: a message is never acknowledged
/// on a guess.
async fn db_step<T, F, Fut>(cancel: &mut watch::Receiver<bool>, mut step: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut delay = Duration::from_millis(50);
    loop {
        match step().await {
            Ok(v) => return Some(v),
            Err(e) => {
                tracing::warn!(error = %e, "dedup table unavailable; retrying");
                if !pause(delay, cancel).await {
                    return None;
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Handles one delivery to the end (see the module doc).
pub(crate) async fn handle(
    node: &Node,
    handler: &Handler,
    spec: &sc::SubscribeRequest,
    d: &pb::Delivery,
    cancel: &mut watch::Receiver<bool>,
) -> Outcome {
    if let Some(only) = redrive_group(d, &spec.topic)
        && only != spec.group.as_bytes()
    {
        // Redriven from the dead-letter topic for the group that gave it
        // up; the topic's other groups handled it the first time.
        Counters::bump(&node.counters.redriven_for_other_groups);
        return Outcome::Done;
    }
    // A child of the producer's span: its context is in the message.
    let span = telemetry::span("sidecar.deliver", || {
        d.message.as_ref().and_then(|m| {
            telemetry::from_headers(
                m.headers
                    .iter()
                    .map(|h| (h.name.as_str(), h.value.as_ref())),
            )
        })
    });
    span.record("topic", spec.topic.as_str());
    handle_traced(node, handler, spec, d, cancel)
        .instrument(span)
        .await
}

/// [`handle`] within its span.
async fn handle_traced(
    node: &Node,
    handler: &Handler,
    spec: &sc::SubscribeRequest,
    d: &pb::Delivery,
    cancel: &mut watch::Receiver<bool>,
) -> Outcome {
    let dedup = sc::DedupMode::try_from(spec.dedup).unwrap_or(sc::DedupMode::Sidecar);
    let row = InboxRow {
        group: spec.group.clone(),
        topic: spec.topic.clone(),
        message_id: d.message.as_ref().map(|m| m.id.clone()).unwrap_or_default(),
    };
    // Every mode, OFF too: a handler left running by a broken session and
    // the next session's redelivery of the same message never run at once
    // (and the key's successors wait behind the redelivery).
    let _claim = tokio::select! {
        c = node.claims.claim(row.clone()) => c,
        _ = cancel.wait_for(|c| *c) => return Outcome::Abandoned,
    };
    let mut claimed = false;
    let outcome = attempts(node, handler, spec, d, dedup, &row, &mut claimed, cancel).await;
    if outcome == Outcome::Abandoned && claimed {
        // Let the partition's next holder go at once rather than after the
        // claim expires (best effort: it expires anyway).
        if let Err(e) = node.db.unclaim(&row, &node.claim_owner).await {
            tracing::debug!(error = %e, "claim not released; it will expire");
        }
    }
    outcome
}

/// The group a message redriven from a dead-letter topic to `topic` is
/// for (`tandem dlq redrive` sets [`REDRIVE_GROUP_HEADER`] and
/// [`REDRIVE_TOPIC_HEADER`]).
fn redrive_group<'a>(d: &'a pb::Delivery, topic: &str) -> Option<&'a [u8]> {
    let headers = &d.message.as_ref()?.headers;
    let header = |name: &str| {
        headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.value.as_ref())
    };
    let group = header(REDRIVE_GROUP_HEADER)?;
    // (A redrive without the topic header, from before it existed, is
    // addressed on any topic.)
    match header(REDRIVE_TOPIC_HEADER) {
        Some(t) if t != topic.as_bytes() => None,
        _ => Some(group),
    }
}

/// The attempts of one delivery, from the dedup check to the dedup row.
#[allow(clippy::too_many_arguments)]
async fn attempts(
    node: &Node,
    handler: &Handler,
    spec: &sc::SubscribeRequest,
    d: &pb::Delivery,
    dedup: sc::DedupMode,
    row: &InboxRow,
    claimed: &mut bool,
    cancel: &mut watch::Receiver<bool>,
) -> Outcome {
    let message = d.message.clone().unwrap_or_default();
    let dedup_on = dedup != sc::DedupMode::Off;
    let mut failures = 0u32;
    let mut crashes = 0u32;
    // Its last call broke with the app's connection while other calls were
    // in the app too: any of them may have killed it.
    let mut suspect = false;
    loop {
        if dedup_on {
            let lifetime = node.config.revoke_timeout().as_millis() as i64;
            let admission = db_step(cancel, || {
                // The claim (SIDECAR mode) lives its whole lifetime from
                // when the inbox writer writes it (after a long database
                // outage too).
                let now = crate::check::now_ms();
                node.inbox.admit(Admit {
                    row: row.clone(),
                    claim: (dedup == sc::DedupMode::Sidecar).then(|| ClaimRequest {
                        owner: node.claim_owner.clone(),
                        now_ms: now,
                        expires_at_ms: now.saturating_add(lifetime),
                    }),
                })
            })
            .await;
            match admission {
                None => return Outcome::Abandoned,
                Some(Admission::Seen) => {
                    Counters::bump(&node.counters.duplicates_skipped);
                    tracing::debug!(group = %row.group, topic = %row.topic, id = %row.message_id, "duplicate skipped");
                    return Outcome::Done;
                }
                Some(Admission::Mine) => *claimed = true,
                Some(Admission::Fresh) => {}
                Some(Admission::Taken) => {
                    Counters::bump(&node.counters.claim_waits);
                    tracing::info!(group = %row.group, topic = %row.topic, id = %row.message_id,
                        "another sidecar of the group is handling this message; waiting");
                    if !pause(CLAIM_POLL, cancel).await {
                        return Outcome::Abandoned;
                    }
                    continue;
                }
            }
        }
        if *cancel.borrow() {
            return Outcome::Abandoned;
        }
        // After a broken call the message has the app to itself, so that a
        // break then is its own doing. The turn is taken after the claim
        // (holding one through a database outage would stop every
        // delivery of this sidecar); a claim must outlive the call, so
        // after a long wait for the turn the claim is renewed first.
        let asked = tokio::time::Instant::now();
        let turn = tokio::select! {
            t = node.turns.take(crashes > 0 || suspect) => t,
            _ = cancel.wait_for(|c| *c) => return Outcome::Abandoned,
        };
        if dedup == sc::DedupMode::Sidecar && asked.elapsed() > MAX_TURN_WAIT {
            continue;
        }
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
        // A retry goes alone: batch-mates of a message that failed (or of
        // a call that failed) are not failed again with it.
        let alone = failures > 0 || crashes > 0 || suspect;
        let called = handler.call(node, request, alone, cancel).await;
        let was_alone = turn.was_alone();
        drop(turn);
        let answer = match called {
            Called::Answered(a) => a,
            // Taken back before it was sent: cancelled, or queued so long
            // that its claim must be renewed (back to the admission).
            Called::Withdrawn => {
                if *cancel.borrow() {
                    return Outcome::Abandoned;
                }
                continue;
            }
        };
        match answer {
            Ok(()) => {
                Counters::bump(&node.counters.handled);
                break;
            }
            Err(status) if unreachable(&status) => {
                // The connection broke during the call (not refused): the
                // app may be dying on this very message. Retried without
                // counting a few times (a restart mid-call is ordinary), but
                // a message that keeps killing the app must not stall its
                // key for ever: past the limit it is dead-lettered. Only a
                // call alone in the app counts: when the app dies, every
                // call in it breaks, and a message that merely shared the
                // app with the killer is not one.
                if status.code() != Code::Unavailable {
                    if was_alone {
                        crashes += 1;
                    } else {
                        suspect = true;
                    }
                }
                let limit = spec.max_attempts.max(MIN_CRASHES);
                if crashes >= limit {
                    Counters::bump(&node.counters.handler_failures);
                    let error = format!(
                        "the app's connection broke during {crashes} calls in which this message was alone in the app (it may crash it): {}",
                        status.message()
                    );
                    if let Err(why) = dead_letter(
                        node,
                        spec,
                        d,
                        message.clone(),
                        failures + crashes,
                        &error,
                        cancel,
                    )
                    .await
                    {
                        return why;
                    }
                    break;
                }
                tracing::warn!(topic = %spec.topic, group = %spec.group, id = %message.id, code = ?status.code(),
                    error = %status.message(), crashes, suspect, "app unreachable; retrying");
                if !pause(UNREACHABLE_DELAY, cancel).await {
                    return Outcome::Abandoned;
                }
            }
            Err(status) => {
                Counters::bump(&node.counters.handler_failures);
                failures += 1;
                tracing::warn!(topic = %spec.topic, group = %spec.group, id = %message.id, attempt = failures,
                    code = ?status.code(), error = %status.message(), "handler failed");
                if failures >= spec.max_attempts {
                    let error = format!("{:?}: {}", status.code(), status.message());
                    if let Err(why) =
                        dead_letter(node, spec, d, message.clone(), failures, &error, cancel).await
                    {
                        return why;
                    }
                    break;
                }
                let delay = Duration::from_millis(u64::from(spec.retry_backoff_ms))
                    .saturating_mul(1 << (failures - 1).min(16));
                if !pause(delay.min(MAX_RETRY_DELAY), cancel).await {
                    return Outcome::Abandoned;
                }
            }
        }
    }
    // The effect happened (or the message was dead-lettered): its record is
    // written whatever else happens meanwhile (revocation, a broken
    // session), or the next holder would hand the message to the app again.
    // Bounded by `revoke_timeout` from here, not by the claim: if this
    // sidecar cannot reach the database for longer than what is left of
    // its claim while another sidecar of the group can and holds the
    // message, that one may call the app again (SIDECAR mode's
    // at-least-once window, as the README says).
    if dedup_on {
        let (_never, mut not_cancelled) = watch::channel(false);
        let recorded = tokio::time::timeout(
            node.config.revoke_timeout(),
            db_step(&mut not_cancelled, || node.inbox.add(row.clone())),
        )
        .await;
        if !matches!(recorded, Ok(Some(()))) {
            tracing::error!(group = %row.group, topic = %row.topic, id = %row.message_id,
                "handled, but its dedup row could not be written: it may be handled again");
            return Outcome::Stuck(format!(
                "message {:?} was handled but its dedup row could not be written",
                row.message_id
            ));
        }
    }
    failpoint::hit("sidecar.consume.before_ack");
    Outcome::Done
}

/// Publishes a failed message to `<topic>.dlq` with what went wrong in its
/// headers. Transient failures are retried a few times; `Err` says what the
/// delivery became when it could not be dead-lettered.
async fn dead_letter(
    node: &Node,
    spec: &sc::SubscribeRequest,
    d: &pb::Delivery,
    mut message: pb::Message,
    attempts: u32,
    error: &str,
    cancel: &mut watch::Receiver<bool>,
) -> Result<(), Outcome> {
    let header = |name: &str, value: String| pb::Header {
        name: name.to_owned(),
        value: Bytes::from(value),
    };
    let mut error = error.to_owned();
    if error.len() > MAX_ERROR_HEADER {
        let mut cut = MAX_ERROR_HEADER;
        while !error.is_char_boundary(cut) {
            cut -= 1;
        }
        error.truncate(cut);
    }
    // A redrive's addressing is not carried into its next dead letter.
    message
        .headers
        .retain(|h| h.name != REDRIVE_GROUP_HEADER && h.name != REDRIVE_TOPIC_HEADER);
    message.headers.extend([
        header("tandem.error", error.clone()),
        header("tandem.topic", spec.topic.clone()),
        header("tandem.group", spec.group.clone()),
        header("tandem.partition", d.partition.to_string()),
        header("tandem.offset", d.offset.to_string()),
        header("tandem.attempts", attempts.to_string()),
    ]);
    message.partition = None;
    // One dead letter per (group, message): a group dead-lettering the same
    // message again (its ack was lost) repeats an id the coordinator's
    // producer dedup remembers, and other groups' dead letters of the
    // message do not collide with it.
    let original = std::mem::take(&mut message.id);
    message.headers.push(header("tandem.id", original.clone()));
    message.id = dead_letter_id(&spec.group, &original);
    let request = pb::PublishRequest {
        topic: format!("{}.dlq", spec.topic),
        messages: vec![message],
    };
    let mut delay = Duration::from_millis(100);
    let mut last = String::new();
    for attempt in 1..=DEAD_LETTER_ATTEMPTS {
        let sent = node
            .call(|mut c| {
                let req = request.clone();
                async move { c.publish(req).await }
            })
            .await;
        match sent {
            Ok(_) => {
                Counters::bump(&node.counters.dead_lettered);
                tracing::warn!(topic = %spec.topic, group = %spec.group, offset = d.offset, %error, "message dead-lettered");
                return Ok(());
            }
            Err(s) if s.code() == Code::AlreadyExists => {
                // Dead-lettered before, with another error text: done.
                tracing::warn!(topic = %spec.topic, group = %spec.group, offset = d.offset, "message was dead-lettered before");
                return Ok(());
            }
            Err(s) => {
                last = format!("{:?}: {}", s.code(), s.message());
                let transient = matches!(
                    s.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
                );
                tracing::warn!(attempt, error = %last, "dead-lettering failed");
                if !transient {
                    break;
                }
                if attempt < DEAD_LETTER_ATTEMPTS && !pause(delay, cancel).await {
                    return Err(Outcome::Abandoned);
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
    Counters::bump(&node.counters.dead_letter_failures);
    Err(Outcome::Stuck(format!(
        "message {:?} at offset {} of {}/{} failed {attempts} times and could not be dead-lettered ({last})",
        d.message
            .as_ref()
            .map(|m| m.id.as_str())
            .unwrap_or_default(),
        d.offset,
        spec.topic,
        d.partition
    )))
}

/// The id of `id`'s dead letter from `group`: `group/id` when that fits in
/// an id, else a fingerprint of both (the original id is in `tandem.id`).
fn dead_letter_id(group: &str, id: &str) -> String {
    let readable = format!("{group}/{id}");
    if readable.len() <= tandem_runtime::MAX_ID_LEN {
        return readable;
    }
    let a = crc32c::crc32c_append(crc32c::crc32c(group.as_bytes()), id.as_bytes());
    let b = crc32c::crc32c_append(crc32c::crc32c(id.as_bytes()), group.as_bytes());
    format!("dlq-{a:08x}{b:08x}-{}", group.len())
}
