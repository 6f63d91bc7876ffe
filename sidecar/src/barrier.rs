//! Saga branches on this participant: the coordinator's branch calls come
//! down the session, run through the branch barrier (`tandem_barrier` in
//! the app's database), and their outcomes go back up.
//!
//! The barrier makes the three classic anomalies harmless:
//! - a repeated call (the coordinator retried after a lost answer or a
//!   restart): the operation's row is there, so it is answered as done
//!   without calling the app; should two calls race to the app, the app's
//!   own insert of the row in its transaction lets one take effect;
//! - a null compensation (the action never committed: it failed, timed out
//!   before it reached the app, or is still on its way): the sidecar
//!   inserts the action's row itself with origin `compensation` and the
//!   compensation's row, and answers done without calling the app;
//! - hanging (the action arrives after its compensation): its row is
//!   there with origin `compensation`, so it is refused without calling the
//!   app, and an action that was already running finds the row when it
//!   inserts its own, and is refused once it answers.
//!
//! An app that answers OK without writing its barrier row gets it written
//! by the sidecar right after (a warning says so): the barrier then still
//! refuses repeats and hanging actions, though without the app's own
//! insert a crash between its commit and that row can run an operation
//! twice.
//!
//! A call of a saga older than this sidecar's `retention_ms` is not run:
//! its barrier rows may have been cleaned up, and a compensation would be
//! taken for a null one. It is answered UNKNOWN, loudly, until an operator
//! raises `retention_ms`.
//!
//! Outcomes: an action's business failure (`BranchResponse.failed`) is
//! FAILED; any other error, a timeout or a database error is UNKNOWN, which
//! the coordinator retries. Reasons are cut to 1 KiB.

use std::time::Duration;

use tandem_proto::app as app_pb;
use tandem_proto::coordinator as pb;
use tonic::Request;

use crate::node::Node;

const ACTION: &str = "action";
const COMPENSATION: &str = "compensation";

type Answer = (pb::BranchOutcome, String);

fn outcome(o: pb::BranchOutcome, reason: impl Into<String>) -> Answer {
    (o, clip(reason.into()))
}

/// `reason` cut to at most 1 KiB, at a character boundary.
fn clip(mut reason: String) -> String {
    const MAX: usize = 1024;
    if reason.len() > MAX {
        let mut end = MAX - 3;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push_str("...");
    }
    reason
}

impl Node {
    /// Runs one branch call through the barrier; its outcome and reason.
    pub(crate) async fn run_branch(&self, call: &pb::BranchCall) -> Answer {
        let age = crate::check::now_ms().saturating_sub(call.saga_started_ms);
        let retention = i64::try_from(self.config.retention.as_millis()).unwrap_or(i64::MAX);
        if call.saga_started_ms > 0 && age > retention {
            tracing::error!(saga = %call.saga_id, branch = %call.branch, age_ms = age, retention_ms = retention, "a call of a saga older than retention_ms: not run (its barrier rows may be gone); raise retention_ms");
            return outcome(
                pb::BranchOutcome::Unknown,
                format!(
                    "the saga is older than the sidecar's retention_ms ({retention}): not run, its barrier may be gone"
                ),
            );
        }
        let result = match pb::BranchOp::try_from(call.op) {
            Ok(pb::BranchOp::Action) => self.act(call).await,
            Ok(pb::BranchOp::Compensation) => self.compensate(call).await,
            _ => Ok(outcome(
                pb::BranchOutcome::Unknown,
                format!("unknown op {}", call.op),
            )),
        };
        result.unwrap_or_else(|e| outcome(pb::BranchOutcome::Unknown, e.to_string()))
    }

    async fn act(&self, call: &pb::BranchCall) -> crate::Result<Answer> {
        let origin = self
            .db
            .barrier_origin(&call.saga_id, &call.branch, ACTION)
            .await?;
        match origin.as_deref() {
            Some(COMPENSATION) => return Ok(refused()),
            Some(_) => return Ok(outcome(pb::BranchOutcome::Succeeded, "ran before")),
            None => {}
        }
        let mut app = self.app("ExecuteBranch")?;
        let answer = self
            .call_app(call, |req| async move { app.execute_branch(req).await })
            .await;
        Ok(match answer {
            Ok(r) if r.failed => {
                let origin = self
                    .db
                    .barrier_origin(&call.saga_id, &call.branch, ACTION)
                    .await?;
                if origin.as_deref() == Some(ACTION) {
                    tracing::warn!(saga = %call.saga_id, branch = %call.branch, "ExecuteBranch answered failed but committed its tandem_barrier row: its compensation will be called; roll the row back with the business change");
                }
                outcome(pb::BranchOutcome::Failed, r.reason)
            }
            Ok(_) => match self.recorded(call, ACTION).await?.as_str() {
                COMPENSATION => refused(),
                _ => outcome(pb::BranchOutcome::Succeeded, ""),
            },
            Err(s) => outcome(pb::BranchOutcome::Unknown, app_error("ExecuteBranch", &s)),
        })
    }

    async fn compensate(&self, call: &pb::BranchCall) -> crate::Result<Answer> {
        let done = self
            .db
            .barrier_origin(&call.saga_id, &call.branch, COMPENSATION)
            .await?;
        if done.is_some() {
            return Ok(outcome(pb::BranchOutcome::Succeeded, "compensated before"));
        }
        if self
            .db
            .barrier_null_compensation(&call.saga_id, &call.branch)
            .await?
        {
            tracing::info!(saga = %call.saga_id, branch = %call.branch, "null compensation: the action never committed");
            return Ok(outcome(
                pb::BranchOutcome::Succeeded,
                "null compensation: the action never committed",
            ));
        }
        let mut app = self.app("CompensateBranch")?;
        let answer = self
            .call_app(call, |req| async move { app.compensate_branch(req).await })
            .await;
        Ok(match answer {
            Ok(r) if r.failed => outcome(
                pb::BranchOutcome::Unknown,
                format!("CompensateBranch answered failed: {}", r.reason),
            ),
            Ok(_) => {
                self.recorded(call, COMPENSATION).await?;
                outcome(pb::BranchOutcome::Succeeded, "")
            }
            Err(s) => outcome(
                pb::BranchOutcome::Unknown,
                app_error("CompensateBranch", &s),
            ),
        })
    }

    /// The origin of `op`'s barrier row after the app answered OK, writing
    /// the row if the app did not.
    async fn recorded(&self, call: &pb::BranchCall, op: &str) -> crate::Result<String> {
        if let Some(origin) = self
            .db
            .barrier_origin(&call.saga_id, &call.branch, op)
            .await?
        {
            return Ok(origin);
        }
        tracing::warn!(saga = %call.saga_id, branch = %call.branch, op, "the app answered OK without writing its tandem_barrier row: written by the sidecar (write it in your transaction)");
        self.db
            .barrier_record(&call.saga_id, &call.branch, op)
            .await
    }

    /// Calls the app within the call's own timeout (`callback_timeout` when
    /// the call has none).
    async fn call_app<F, Fut>(
        &self,
        call: &pb::BranchCall,
        f: F,
    ) -> Result<app_pb::BranchResponse, tonic::Status>
    where
        F: FnOnce(Request<app_pb::BranchRequest>) -> Fut,
        Fut: std::future::Future<
                Output = Result<tonic::Response<app_pb::BranchResponse>, tonic::Status>,
            >,
    {
        let limit = match call.timeout_ms {
            0 => self.config.callback_timeout,
            ms => Duration::from_millis(ms),
        };
        let mut req = Request::new(app_pb::BranchRequest {
            saga_id: call.saga_id.clone(),
            branch: call.branch.clone(),
            operation: call.operation.clone(),
            payload: call.payload.clone(),
            attempt: call.attempt,
            saga_service: call.saga_service.clone(),
        });
        req.set_timeout(limit);
        match tokio::time::timeout(limit, f(req)).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {} ms",
                limit.as_millis()
            ))),
        }
    }
}

fn refused() -> Answer {
    outcome(
        pb::BranchOutcome::Failed,
        "refused: the branch was compensated before its action arrived",
    )
}

fn app_error(call: &str, s: &tonic::Status) -> String {
    format!("{call} failed: {:?}: {}", s.code(), s.message())
}
