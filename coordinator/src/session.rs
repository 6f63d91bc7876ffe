//! Producer-service sessions: the long-lived stream each sidecar holds to
//! the coordinator. A check-back travels down the session of the instance
//! that prepared the transaction while it is live (only that instance knows
//! whether its app is still running the local transaction) for the first
//! two attempts and every odd one after; other attempts, and every attempt
//! once the preparer is gone, go down the live instances of the service in
//! turn; answers come back up. An answer
//! counts only if it names the transaction that was asked about and comes
//! from a session of that transaction's service. Sending never waits
//! longer than the check's timeout for room in a session's queue.
//!
//! Saga branch calls travel down the sessions of the branch's service in
//! turn; a call waits (within its timeout) for a session of that service
//! to be live, so a participant whose sidecar is reconnecting, or a
//! coordinator that just started, does not fail it at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tandem_proto::coordinator as pb;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

type Outbox = mpsc::Sender<Result<pb::SessionResponse, Status>>;

struct Entry {
    id: u64,
    instance: String,
    tx: Outbox,
}

/// What became of a branch call.
pub(crate) enum BranchReply {
    /// The sidecar answered.
    Answered(pb::BranchResult),
    /// No session of the service took it: it never reached the service.
    NoSession,
    /// A session took it and no answer came in time: it may have run.
    NoAnswer,
}

struct Pending {
    /// The transaction or saga asked about.
    about: String,
    service: String,
    reply: Reply,
}

enum Reply {
    Check(oneshot::Sender<pb::LocalState>),
    Branch(oneshot::Sender<pb::BranchResult>),
}

/// Live sessions by service, and check-backs awaiting an answer.
#[derive(Default)]
pub(crate) struct Sessions {
    services: Mutex<HashMap<String, Vec<Entry>>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    turn: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Sessions {
    /// Registers a session of `service`'s sidecar `instance`; returns its id.
    pub(crate) fn register(&self, service: &str, instance: &str, tx: Outbox) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&self.services)
            .entry(service.to_owned())
            .or_default()
            .push(Entry {
                id,
                instance: instance.to_owned(),
                tx,
            });
        id
    }

    /// Live sessions per service, and check-backs awaiting an answer.
    pub(crate) fn counts(&self) -> (std::collections::BTreeMap<String, usize>, usize) {
        let services = lock(&self.services)
            .iter()
            .map(|(s, v)| (s.clone(), v.len()))
            .collect();
        (services, lock(&self.pending).len())
    }

    pub(crate) fn unregister(&self, service: &str, id: u64) {
        let mut services = lock(&self.services);
        if let Some(v) = services.get_mut(service) {
            v.retain(|e| e.id != id);
            if v.is_empty() {
                services.remove(service);
            }
        }
    }

    /// Asks a live session of `service` about a transaction: the one of
    /// `instance` if it is live, else any in turn; `None` if no session is
    /// live or none answers within `timeout`.
    pub(crate) async fn check(
        &self,
        service: &str,
        instance: &str,
        mut req: pb::CheckTransaction,
        timeout: Duration,
    ) -> Option<pb::LocalState> {
        let tx = {
            let services = lock(&self.services);
            let v = services.get(service).filter(|v| !v.is_empty())?;
            // The preparer is asked first and on every odd attempt; even
            // attempts after the second go to the instances in turn, so a
            // preparer whose app is gone (its sidecar still connected)
            // cannot make every check of a committed transaction go
            // unanswered until the final action rolls it back.
            let prefer = req.attempt <= 2 || !req.attempt.is_multiple_of(2);
            let preparer = v.iter().rfind(|e| e.instance == instance);
            match preparer.filter(|_| !instance.is_empty() && prefer) {
                Some(e) => e.tx.clone(),
                None => v[self.turn.fetch_add(1, Ordering::Relaxed) % v.len()]
                    .tx
                    .clone(),
            }
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let check_id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        req.check_id = check_id;
        let (reply, rx) = oneshot::channel();
        lock(&self.pending).insert(
            check_id,
            Pending {
                about: req.txn_id.clone(),
                service: service.to_owned(),
                reply: Reply::Check(reply),
            },
        );
        let msg = pb::SessionResponse {
            kind: Some(pb::session_response::Kind::Check(req)),
        };
        let answer = match tx.send_timeout(Ok(msg), timeout).await {
            Ok(()) => tokio::time::timeout_at(deadline, rx)
                .await
                .ok()
                .and_then(Result::ok),
            Err(_) => None,
        };
        lock(&self.pending).remove(&check_id);
        answer
    }

    /// Takes an answer from a session of `service`; ignores answers that do
    /// not match the question.
    pub(crate) fn answer(&self, service: &str, result: pb::CheckResult) {
        let mut pending = lock(&self.pending);
        let matches = pending.get(&result.check_id).is_some_and(|p| {
            p.about == result.txn_id && p.service == service && matches!(p.reply, Reply::Check(_))
        });
        if !matches {
            tracing::warn!(service, check_id = result.check_id, txn = %result.txn_id, "check-back answer does not match a question: ignored");
            return;
        }
        if let Some(Pending {
            reply: Reply::Check(reply),
            ..
        }) = pending.remove(&result.check_id)
        {
            let state = pb::LocalState::try_from(result.state).unwrap_or(pb::LocalState::Unknown);
            let _ = reply.send(state);
        }
    }

    /// Asks a live session of `service` to run a saga branch operation;
    /// waits up to `timeout` for a session to be live and for its answer.
    pub(crate) async fn branch(
        &self,
        service: &str,
        mut req: pb::BranchCall,
        timeout: Duration,
    ) -> BranchReply {
        let deadline = tokio::time::Instant::now() + timeout;
        let tx = loop {
            let live = {
                let services = lock(&self.services);
                services.get(service).filter(|v| !v.is_empty()).map(|v| {
                    v[self.turn.fetch_add(1, Ordering::Relaxed) % v.len()]
                        .tx
                        .clone()
                })
            };
            if let Some(tx) = live {
                break tx;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return BranchReply::NoSession;
            }
            tokio::time::sleep((deadline - now).min(Duration::from_millis(100))).await;
        };
        let call_id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        req.call_id = call_id;
        let (reply, rx) = oneshot::channel();
        lock(&self.pending).insert(
            call_id,
            Pending {
                about: req.saga_id.clone(),
                service: service.to_owned(),
                reply: Reply::Branch(reply),
            },
        );
        let msg = pb::SessionResponse {
            kind: Some(pb::session_response::Kind::Branch(req)),
        };
        let answer = match tokio::time::timeout_at(deadline, tx.send(Ok(msg))).await {
            Ok(Ok(())) => match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(r)) => BranchReply::Answered(r),
                _ => BranchReply::NoAnswer,
            },
            // Not handed to the session (it closed, or its queue stayed
            // full): the call never left.
            _ => BranchReply::NoSession,
        };
        lock(&self.pending).remove(&call_id);
        answer
    }

    /// Takes a branch's answer from a session of `service`; ignores answers
    /// that do not match the call.
    pub(crate) fn branch_answer(&self, service: &str, result: pb::BranchResult) {
        let mut pending = lock(&self.pending);
        let matches = pending.get(&result.call_id).is_some_and(|p| {
            p.about == result.saga_id && p.service == service && matches!(p.reply, Reply::Branch(_))
        });
        if !matches {
            tracing::warn!(service, call_id = result.call_id, saga = %result.saga_id, "branch answer does not match a call: ignored");
            return;
        }
        if let Some(Pending {
            reply: Reply::Branch(reply),
            ..
        }) = pending.remove(&result.call_id)
        {
            let _ = reply.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_must_name_the_transaction_and_come_from_its_service() {
        let sessions = std::sync::Arc::new(Sessions::default());
        let (tx, mut rx) = mpsc::channel(4);
        sessions.register("orders", "i1", tx);
        let s = sessions.clone();
        let asker = tokio::spawn(async move {
            let req = pb::CheckTransaction {
                txn_id: "t1".into(),
                ..Default::default()
            };
            s.check("orders", "", req, Duration::from_secs(5)).await
        });
        let Some(Ok(pb::SessionResponse {
            kind: Some(pb::session_response::Kind::Check(c)),
        })) = rx.recv().await
        else {
            panic!("check-back sent");
        };
        let answer = |service: &str, txn: &str, state| {
            sessions.answer(
                service,
                pb::CheckResult {
                    check_id: c.check_id,
                    txn_id: txn.into(),
                    state: state as i32,
                },
            )
        };
        answer("orders", "t2", pb::LocalState::Rollback); // another transaction
        answer("carts", "t1", pb::LocalState::Rollback); // another service
        answer("orders", "t1", pb::LocalState::Commit);
        assert_eq!(asker.await.ok().flatten(), Some(pb::LocalState::Commit));
    }

    #[tokio::test]
    async fn no_session_or_no_answer_is_none() {
        let sessions = Sessions::default();
        assert_eq!(
            sessions
                .check("nobody", "", Default::default(), Duration::from_millis(10))
                .await,
            None
        );
        let (tx, _rx) = mpsc::channel(4);
        sessions.register("quiet", "i1", tx);
        assert_eq!(
            sessions
                .check("quiet", "i1", Default::default(), Duration::from_millis(20))
                .await,
            None
        );
    }
}
