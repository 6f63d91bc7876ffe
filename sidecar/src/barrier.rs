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
//! Outcomes: an action's business failure (`BranchResponse.failed`, or the
//! status ABORTED) is FAILED; any other error, a timeout or a database
//! error is UNKNOWN, which the coordinator retries.

use std::time::Duration;

use tandem_proto::app as app_pb;
use tandem_proto::coordinator as pb;
use tonic::{Code, Request};

use crate::node::Node;

const ACTION: &str = "action";
const COMPENSATION: &str = "compensation";

fn outcome(o: pb::BranchOutcome, reason: impl Into<String>) -> (pb::BranchOutcome, String) {
    (o, reason.into())
}

impl Node {
    /// Runs one branch call through the barrier; its outcome and reason.
    pub(crate) async fn run_branch(&self, call: &pb::BranchCall) -> (pb::BranchOutcome, String) {
        let compensation = call.op == pb::BranchOp::Compensation as i32;
        let result = if compensation {
            self.compensate(call).await
        } else {
            self.act(call).await
        };
        result.unwrap_or_else(|e| outcome(pb::BranchOutcome::Unknown, e.to_string()))
    }

    async fn act(&self, call: &pb::BranchCall) -> crate::Result<(pb::BranchOutcome, String)> {
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
            Ok(r) if r.failed => outcome(pb::BranchOutcome::Failed, r.reason),
            Ok(_) => {
                let origin = self
                    .db
                    .barrier_origin(&call.saga_id, &call.branch, ACTION)
                    .await?;
                match origin.as_deref() {
                    Some(COMPENSATION) => refused(),
                    _ => outcome(pb::BranchOutcome::Succeeded, ""),
                }
            }
            Err(s) if s.code() == Code::Aborted => outcome(pb::BranchOutcome::Failed, s.message()),
            Err(s) => outcome(pb::BranchOutcome::Unknown, app_error("ExecuteBranch", &s)),
        })
    }

    async fn compensate(
        &self,
        call: &pb::BranchCall,
    ) -> crate::Result<(pb::BranchOutcome, String)> {
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
            Ok(_) => outcome(pb::BranchOutcome::Succeeded, ""),
            Err(s) => outcome(
                pb::BranchOutcome::Unknown,
                app_error("CompensateBranch", &s),
            ),
        })
    }

    /// Calls the app within the call's own timeout and `callback_timeout`.
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
        let mut limit = self.config.callback_timeout;
        if call.timeout_ms > 0 {
            limit = limit.min(Duration::from_millis(call.timeout_ms));
        }
        let mut req = Request::new(app_pb::BranchRequest {
            saga_id: call.saga_id.clone(),
            branch: call.branch.clone(),
            operation: call.operation.clone(),
            payload: call.payload.clone(),
            attempt: call.attempt,
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

fn refused() -> (pb::BranchOutcome, String) {
    outcome(
        pb::BranchOutcome::Failed,
        "refused: the branch was compensated before its action arrived",
    )
}

fn app_error(call: &str, s: &tonic::Status) -> String {
    format!("{call} failed: {:?}: {}", s.code(), s.message())
}
