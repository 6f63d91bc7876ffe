//! Answering check-backs (steps 6–7): how did the app's local transaction
//! end?
//!
//! - A transaction whose `ExecuteLocalTransaction` this sidecar started and
//!   has not seen through is answered by the sidecar itself: UNKNOWN while
//!   the callback runs (the app cannot know yet, and an app that answers
//!   ROLLBACK because its row is not there *yet* would lose the message),
//!   the callback's answer once it returned.
//! - Table mode: the answer is in `tandem_txn`; when the row is absent and
//!   the transaction is older than the coordinator's `check_after_ms` (sent
//!   with each check), the rollback marker is inserted first under the same
//!   key, so the app's late commit fails instead of committing a message
//!   that was rolled back.
//! - Callback mode otherwise: the app's `CheckLocalTransaction` answers,
//!   within the check's own timeout. Anything uncertain is UNKNOWN, which
//!   the coordinator retries.

use std::time::Duration;

use tandem_proto::app as app_pb;
use tandem_proto::coordinator as pb;
use tandem_runtime::telemetry;
use tracing::Instrument;

use crate::db::TableState;
use crate::error::Error;
use crate::node::Node;

/// How a transaction is checked back; kept as the half message's opaque
/// context, so every sidecar instance of the service answers alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Table,
    Callback,
}

impl Mode {
    pub(crate) fn context(self) -> &'static [u8] {
        match self {
            Mode::Table => b"check=table",
            Mode::Callback => b"check=callback",
        }
    }

    fn of(context: &[u8]) -> Mode {
        if context == Mode::Callback.context() {
            Mode::Callback
        } else {
            Mode::Table
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Node {
    /// The state of the local transaction a check-back asks about.
    pub(crate) async fn local_state(&self, check: &pb::CheckTransaction) -> pb::LocalState {
        if let Some(state) = self.executing.state(&check.txn_id) {
            return state;
        }
        // A child of the coordinator's check-back span (its context is in
        // the message's headers).
        let incoming = check.message.as_ref().and_then(|m| {
            telemetry::from_headers(
                m.headers
                    .iter()
                    .map(|h| (h.name.as_str(), h.value.as_ref())),
            )
        });
        let span = telemetry::span("sidecar.check", || incoming.clone());
        span.record("txn", check.txn_id.as_str());
        span.record("topic", check.topic.as_str());
        let tp = telemetry::pass_on(&span, incoming.as_deref());
        let result = match Mode::of(&check.context) {
            Mode::Table => self.table_state(check).instrument(span).await,
            Mode::Callback => self.callback_state(check, tp).instrument(span).await,
        };
        match result {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(txn = %check.txn_id, error = %e, "check-back: state unknown");
                pb::LocalState::Unknown
            }
        }
    }

    async fn table_state(&self, check: &pb::CheckTransaction) -> Result<pb::LocalState, Error> {
        let mut state = self.db.txn_state(&check.txn_id).await?;
        let age = now_ms() - check.prepared_at_ms;
        if state == TableState::Absent && age >= check.check_after_ms as i64 {
            state = self.db.mark_rolled_back(&check.txn_id).await?;
        }
        Ok(match state {
            TableState::Committed => pb::LocalState::Commit,
            TableState::RolledBack => pb::LocalState::Rollback,
            TableState::Absent => pb::LocalState::Unknown,
        })
    }

    async fn callback_state(
        &self,
        check: &pb::CheckTransaction,
        tp: Option<String>,
    ) -> Result<pb::LocalState, Error> {
        let mut app = self.app("CheckLocalTransaction")?;
        let req = app_pb::CheckLocalTransactionRequest {
            txn_id: check.txn_id.clone(),
            topic: check.topic.clone(),
            message: check.message.clone(),
            prepared_at_ms: check.prepared_at_ms,
            attempt: check.attempt,
        };
        let mut limit = self.config.callback_timeout;
        if check.timeout_ms > 0 {
            limit = limit.min(Duration::from_millis(check.timeout_ms));
        }
        let mut req = tonic::Request::new(req);
        telemetry::to_metadata(req.metadata_mut(), tp.as_deref());
        let reply = tokio::time::timeout(limit, app.check_local_transaction(req))
            .await
            .map_err(|_| Error::App {
                call: "CheckLocalTransaction",
                status: tonic::Status::deadline_exceeded("no answer within callback_timeout_ms"),
            })?
            .map_err(|status| Error::App {
                call: "CheckLocalTransaction",
                status,
            })?;
        Ok(pb::LocalState::try_from(reply.into_inner().state).unwrap_or(pb::LocalState::Unknown))
    }
}
