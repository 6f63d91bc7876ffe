//! The saga driver over real gRPC on both stores: a test plays the
//! participant sidecar on a session, answering branch calls as told, while
//! the coordinator is restarted under it. Durability contract checked: an
//! acknowledged start survives a restart, a saga finishes after one, and
//! the calls that were out are made again under new numbers.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use prost::Message;
use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tokio::sync::mpsc;

on_both_stores!(
    sagas_finish_across_a_restart_with_their_calls_repeated,
    a_saga_begun_in_a_transaction_starts_when_it_commits,
);

/// (saga, branch, op, attempt) of every call received, in order.
type Seen = Arc<Mutex<Vec<(String, String, i32, u32)>>>;

/// Plays the sidecar of `service`: answers each branch call with
/// `answer(call)`; `None` leaves it unanswered.
async fn participant(
    addr: std::net::SocketAddr,
    service: &str,
    seen: Seen,
    answer: impl Fn(&pb::BranchCall) -> Option<(pb::BranchOutcome, &'static str)> + Send + 'static,
) -> TestResult<tokio::task::JoinHandle<()>> {
    let mut client = CoordinatorClient::connect(format!("http://{addr}")).await?;
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::SessionRequest {
        kind: Some(pb::session_request::Kind::Hello(pb::Hello {
            service: service.into(),
            instance: "test".into(),
        })),
    })
    .await?;
    let mut stream = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok(tokio::spawn(async move {
        while let Ok(Some(msg)) = stream.message().await {
            let Some(pb::session_response::Kind::Branch(call)) = msg.kind else {
                continue;
            };
            seen.lock().expect("not poisoned").push((
                call.saga_id.clone(),
                call.branch.clone(),
                call.op,
                call.attempt,
            ));
            if let Some((outcome, reason)) = answer(&call) {
                let result = pb::BranchResult {
                    call_id: call.call_id,
                    saga_id: call.saga_id,
                    outcome: outcome as i32,
                    reason: reason.into(),
                };
                let kind = pb::session_request::Kind::BranchResult(result);
                let _ = tx.send(pb::SessionRequest { kind: Some(kind) }).await;
            }
        }
    }))
}

fn branch(name: &str, service: &str) -> pb::SagaBranch {
    pb::SagaBranch {
        name: name.into(),
        service: service.into(),
        action: "do".into(),
        compensation: "undo".into(),
        initial_backoff_ms: 20,
        max_backoff_ms: 100,
        ..Default::default()
    }
}

fn start(id: &str, branches: Vec<pb::SagaBranch>) -> pb::StartSagaRequest {
    pb::StartSagaRequest {
        saga_id: id.into(),
        service: "starter".into(),
        definition: Some(pb::SagaDefinition {
            branches,
            concurrent: false,
            timeout_ms: 0,
        }),
    }
}

async fn wait_finished(
    c: &mut CoordinatorClient<tonic::transport::Channel>,
    id: &str,
) -> TestResult<pb::Saga> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match c.get_saga(pb::GetSagaRequest { saga_id: id.into() }).await {
            Ok(s) => {
                let s = s.into_inner();
                if s.status == pb::SagaStatus::Succeeded as i32
                    || s.status == pb::SagaStatus::Compensated as i32
                {
                    return Ok(s);
                }
            }
            Err(e) if e.code() == tonic::Code::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("saga {id} did not finish within {WAIT:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const ACTION: i32 = pb::BranchOp::Action as i32;
const COMPENSATION: i32 = pb::BranchOp::Compensation as i32;

async fn sagas_finish_across_a_restart_with_their_calls_repeated(backend: Backend) -> TestResult {
    let Some(store) = TestStore::new(backend).await? else {
        return Ok(());
    };
    let c = Running::start(&store).await?;
    let mut client = c.client().await?;
    // Before the restart the participant answers branch "a" only.
    let seen: Seen = Arc::default();
    let p = participant(c.addr, "p", seen.clone(), |call| {
        match call.branch.as_str() {
            "a" => Some((pb::BranchOutcome::Succeeded, "")),
            _ => None,
        }
    })
    .await?;
    client
        .start_saga(start("ok", vec![branch("a", "p"), branch("held", "p")]))
        .await?;
    client
        .start_saga(start("undo", vec![branch("a", "p"), branch("no", "p")]))
        .await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen
        .lock()
        .expect("not poisoned")
        .iter()
        .filter(|s| s.1 == "held" || s.1 == "no")
        .count()
        < 2
    {
        assert!(tokio::time::Instant::now() < deadline, "calls never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.abort();
    c.stop().await?;

    let c = Running::start(&store).await?;
    let mut client = c.client().await?;
    let after: Seen = Arc::default();
    let _p = participant(c.addr, "p", after.clone(), |call| {
        match call.branch.as_str() {
            "no" if call.op == ACTION => Some((pb::BranchOutcome::Failed, "declined")),
            _ => Some((pb::BranchOutcome::Succeeded, "")),
        }
    })
    .await?;
    let ok = wait_finished(&mut client, "ok").await?;
    assert_eq!(ok.status, pb::SagaStatus::Succeeded as i32, "{ok:?}");
    let undo = wait_finished(&mut client, "undo").await?;
    assert_eq!(undo.status, pb::SagaStatus::Compensated as i32, "{undo:?}");
    assert_eq!(undo.reason, "branch no failed: declined");

    let after = after.lock().expect("not poisoned").clone();
    let mut per: BTreeMap<(String, String, i32), Vec<u32>> = BTreeMap::new();
    for (saga, branch, op, attempt) in &after {
        per.entry((saga.clone(), branch.clone(), *op))
            .or_default()
            .push(*attempt);
    }
    // The calls out at the restart were made again under new numbers; a
    // branch answered before the restart was not called again.
    assert_eq!(
        per.get(&("ok".into(), "held".into(), ACTION)),
        Some(&vec![2])
    );
    assert_eq!(
        per.get(&("undo".into(), "no".into(), ACTION)),
        Some(&vec![2])
    );
    assert_eq!(per.get(&("ok".into(), "a".into(), ACTION)), None);
    // Compensation: the failed branch (null at its barrier), then a.
    let comps: Vec<&str> = after
        .iter()
        .filter(|s| s.0 == "undo" && s.2 == COMPENSATION)
        .map(|s| s.1.as_str())
        .collect();
    assert_eq!(comps, vec!["no", "a"]);

    let list = client
        .list_sagas(pb::ListSagasRequest {
            status: pb::SagaStatus::Compensated as i32,
            limit: 0,
        })
        .await?
        .into_inner();
    let ids: Vec<&str> = list.sagas.iter().map(|s| s.saga_id.as_str()).collect();
    assert_eq!(ids, vec!["undo"]);
    c.stop().await
}

async fn a_saga_begun_in_a_transaction_starts_when_it_commits(backend: Backend) -> TestResult {
    let Some(store) = TestStore::new(backend).await? else {
        return Ok(());
    };
    let c = Running::start(&store).await?;
    let mut client = c.client().await?;
    let seen: Seen = Arc::default();
    let _p = participant(c.addr, "p", seen.clone(), |_| {
        Some((pb::BranchOutcome::Succeeded, ""))
    })
    .await?;
    let prepare = |id: &str| pb::PrepareRequest {
        service: "orders".into(),
        topic: "__sagas".into(),
        message: Some(pb::Message {
            key: Some(id.as_bytes().to_vec().into()),
            value: start(id, vec![branch("a", "p")]).encode_to_vec().into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let t1 = client
        .prepare(prepare("committed"))
        .await?
        .into_inner()
        .txn_id;
    let t2 = client
        .prepare(prepare("rolled-back"))
        .await?
        .into_inner()
        .txn_id;
    let end = |txn_id: &str| pb::EndTransactionRequest {
        service: "orders".into(),
        txn_id: txn_id.into(),
    };
    client.rollback(end(&t2)).await?;
    client.commit(end(&t1)).await?;
    let s = wait_finished(&mut client, "committed").await?;
    assert_eq!(s.service, "orders", "the preparing service starts it");
    // Its id is taken: another definition under it is refused at prepare.
    let mut again = prepare("committed");
    if let Some(m) = again.message.as_mut() {
        m.value = start("committed", vec![branch("other", "p")])
            .encode_to_vec()
            .into();
    }
    let e = client.prepare(again).await.expect_err("taken");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    // An id begun in a transaction not committed yet is held: another
    // definition under it is refused, by a prepare or a plain start.
    let held = client.prepare(prepare("held")).await?.into_inner().txn_id;
    let mut other = prepare("held");
    if let Some(m) = other.message.as_mut() {
        m.value = start("held", vec![branch("other", "p")])
            .encode_to_vec()
            .into();
    }
    let e = client.prepare(other).await.expect_err("held");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    let e = client
        .start_saga(start("held", vec![branch("other", "p")]))
        .await
        .expect_err("held");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    client.commit(end(&held)).await?;
    wait_finished(&mut client, "held").await?;
    // A restart reads the log again and starts nothing twice.
    c.stop().await?;
    let c = Running::start(&store).await?;
    let mut client = c.client().await?;
    let _p = participant(c.addr, "p", seen.clone(), |_| {
        Some((pb::BranchOutcome::Succeeded, ""))
    })
    .await?;
    let t3 = client.prepare(prepare("later")).await?.into_inner().txn_id;
    client.commit(end(&t3)).await?;
    wait_finished(&mut client, "later").await?;
    let e = client
        .get_saga(pb::GetSagaRequest {
            saga_id: "rolled-back".into(),
        })
        .await
        .expect_err("never started");
    assert_eq!(e.code(), tonic::Code::NotFound);
    let calls = seen.lock().expect("not poisoned").clone();
    assert_eq!(
        calls.iter().filter(|s| s.0 == "committed").count(),
        1,
        "{calls:?}"
    );
    // A plain publish to the topic of saga starts is refused.
    let e = client
        .publish(pb::PublishRequest {
            topic: "__sagas".into(),
            messages: vec![pb::Message::default()],
        })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // So is a prepare whose saga is malformed, naming the field.
    let mut bad = prepare("bad");
    if let Some(m) = bad.message.as_mut() {
        m.value = start("bad", vec![branch("a", "")]).encode_to_vec().into();
    }
    let e = client.prepare(bad).await.expect_err("refused");
    assert!(
        e.message()
            .starts_with("message.value.definition.branches[0].service:"),
        "{}",
        e.message()
    );
    c.stop().await
}
