//! The sidecar's long-lived session streams to the coordinator replicas.
//! Each says which service this is, heartbeats, and answers the
//! check-backs and saga branch calls that come down it; when a stream
//! breaks it reconnects with backoff, so check-back keeps working across
//! coordinator and sidecar restarts.
//!
//! One session follows the replica the sidecar's calls use. Replicas on a
//! shared store each own some shards and check back through their own
//! sessions, and they list the live replicas in the session's Welcome (and
//! again whenever the list changes): the sidecar holds a session with each
//! one listed, and drops those no longer listed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use crate::node::{Counters, Node, stopped};

const HEARTBEAT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Keeps sessions open until `shutdown` turns true: one with the replica
/// in use, and one with each replica the coordinators list.
pub(crate) async fn run(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let (listed_tx, mut listed) = watch::channel(Vec::<String>::new());
    let listed_tx = Arc::new(listed_tx);
    let follow = tokio::spawn(keep(
        node.clone(),
        None,
        shutdown.clone(),
        listed_tx.clone(),
    ));
    let mut each: HashMap<String, (watch::Sender<bool>, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    loop {
        tokio::select! {
            r = listed.changed() => {
                if r.is_err() {
                    break;
                }
                let now: Vec<String> = listed.borrow_and_update().clone();
                each.retain(|addr, (stop, _)| {
                    let keep = now.contains(addr);
                    if !keep {
                        tracing::info!(coordinator = %addr, "replica no longer listed: its session ends");
                        stop.send_replace(true);
                    }
                    keep
                });
                for addr in now {
                    if each.contains_key(&addr) {
                        continue;
                    }
                    let Ok(client) = node.coordinators.connect(&node.coordinators.url_of(&addr)) else {
                        tracing::warn!(coordinator = %addr, "a listed replica's address is not usable");
                        continue;
                    };
                    let (stop, stop_rx) = watch::channel(false);
                    let task = tokio::spawn(keep(node.clone(), Some(client), stop_rx, listed_tx.clone()));
                    each.insert(addr, (stop, task));
                }
            }
            () = stopped(&mut shutdown) => break,
        }
    }
    for (stop, _) in each.values() {
        stop.send_replace(true);
    }
    for (_, (_, task)) in each {
        let _ = task.await;
    }
    let _ = follow.await;
}

/// Keeps one session open until `shutdown` turns true: with `client`, or
/// (`None`) with whichever replica the sidecar's calls use.
async fn keep(
    node: Arc<Node>,
    client: Option<CoordinatorClient<Channel>>,
    mut shutdown: watch::Receiver<bool>,
    listed: Arc<watch::Sender<Vec<String>>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(&node, client.clone(), &listed, &mut shutdown, &mut backoff).await {
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

/// Tells the others which replicas a coordinator listed.
fn listed_now(listed: &watch::Sender<Vec<String>>, mut replicas: Vec<String>) {
    replicas.sort();
    replicas.dedup();
    listed.send_if_modified(|v| {
        let changed = *v != replicas;
        if changed {
            *v = replicas;
        }
        changed
    });
}

async fn session(
    node: &Arc<Node>,
    fixed: Option<CoordinatorClient<Channel>>,
    listed: &watch::Sender<Vec<String>>,
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
    let (replica, mut client) = match fixed.clone() {
        Some(c) => (None, c),
        None => {
            let (i, c) = node.coordinators.pick();
            (Some(i), c)
        }
    };
    let opened = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let mut stream = match opened {
        Ok(s) => s.into_inner(),
        Err(s) => {
            if let Some(replica) = replica {
                node.coordinators.failed(replica, &s).await;
            }
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
                    tracing::info!(session = %w.session_id, replicas = ?w.replicas, "coordinator session open");
                    *backoff = Duration::from_millis(100);
                    if !w.replicas.is_empty() {
                        listed_now(listed, w.replicas);
                    }
                }
                Some(pb::SessionResponse { kind: Some(pb::session_response::Kind::Replicas(r)) }) => {
                    tracing::info!(replicas = ?r.replicas, "coordinator replicas changed");
                    if !r.replicas.is_empty() {
                        listed_now(listed, r.replicas);
                    }
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
