//! The sidecar's one long-lived session stream to the coordinator. It says
//! which service this is, heartbeats, and answers the check-backs and saga
//! branch calls that come down it; when the stream breaks it reconnects with backoff, so check-back
//! keeps working across coordinator and sidecar restarts.

use std::sync::Arc;
use std::time::Duration;

use tandem_proto::coordinator as pb;
use tokio::sync::{mpsc, watch};

use crate::node::{Counters, Node, stopped};

const HEARTBEAT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Keeps a session open until `shutdown` turns true.
pub(crate) async fn run(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(&node, &mut shutdown, &mut backoff).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "coordinator session lost")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stopped(&mut shutdown) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn request(kind: pb::session_request::Kind) -> pb::SessionRequest {
    pb::SessionRequest { kind: Some(kind) }
}

async fn session(
    node: &Arc<Node>,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Result<(), String> {
    let (tx, rx) = mpsc::channel(64);
    let hello = pb::Hello {
        service: node.config.service.clone(),
        instance: node.config.instance.clone(),
    };
    tx.send(request(pb::session_request::Kind::Hello(hello)))
        .await
        .map_err(|e| e.to_string())?;
    let (replica, mut client) = node.coordinators.pick();
    let opened = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let mut stream = match opened {
        Ok(s) => s.into_inner(),
        Err(s) => {
            node.coordinators.failed(replica, &s).await;
            return Err(s.message().to_owned());
        }
    };
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                tx.send(request(pb::session_request::Kind::Heartbeat(pb::Heartbeat {})))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            m = stream.message() => match m.map_err(|s| s.message().to_owned())? {
                None => return Err("the coordinator closed the session".into()),
                Some(pb::SessionResponse { kind: Some(pb::session_response::Kind::Welcome(w)) }) => {
                    tracing::info!(session = %w.session_id, "coordinator session open");
                    *backoff = Duration::from_millis(100);
                }
                Some(pb::SessionResponse { kind: Some(pb::session_response::Kind::Check(check)) }) => {
                    let (node, tx) = (node.clone(), tx.clone());
                    tokio::spawn(async move {
                        let state = node.local_state(&check).await;
                        tracing::debug!(txn = %check.txn_id, attempt = check.attempt, ?state, "answering check-back");
                        Counters::bump(&node.counters.check_backs_answered);
                        let result = pb::CheckResult {
                            check_id: check.check_id,
                            txn_id: check.txn_id,
                            state: state as i32,
                        };
                        let _ = tx.send(request(pb::session_request::Kind::CheckResult(result))).await;
                    });
                }
                Some(pb::SessionResponse { kind: Some(pb::session_response::Kind::Branch(call)) }) => {
                    let (node, tx) = (node.clone(), tx.clone());
                    tokio::spawn(async move {
                        let (outcome, reason) = node.run_branch(&call).await;
                        tracing::debug!(saga = %call.saga_id, branch = %call.branch, op = call.op, attempt = call.attempt, ?outcome, %reason, "answering a branch call");
                        let result = pb::BranchResult {
                            call_id: call.call_id,
                            saga_id: call.saga_id,
                            outcome: outcome as i32,
                            reason,
                        };
                        let _ = tx.send(request(pb::session_request::Kind::BranchResult(result))).await;
                    });
                }
                Some(_) => {}
            },
            () = stopped(shutdown) => return Ok(()),
        }
    }
}
