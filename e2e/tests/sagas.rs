//! Sagas end to end, with real processes: the coordinator drives each saga,
//! branch calls go down the sessions of the `orders` and `cart` sidecars,
//! and the test apps run actions and compensations with the branch barrier
//! in their SQLite databases (see `tandem_e2e::testapp`). Each test reads
//! the outcome back from the apps' own tables: `ledger` holds one row per
//! effect (no unique key, so a doubled effect would show), `branch_calls`
//! every call the app received, `tandem_barrier` the barrier rows.

mod common;

use std::time::Duration;

use common::*;
use sqlx::SqlitePool;
use tandem_proto::coordinator as pb;
use tonic::Code;

fn branch(name: &str, service: &str, payload: &str) -> pb::SagaBranch {
    pb::SagaBranch {
        name: name.into(),
        service: service.into(),
        action: format!("{name}-do"),
        compensation: format!("{name}-undo"),
        payload: payload.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

fn start(id: &str, branches: Vec<pb::SagaBranch>) -> pb::StartSagaRequest {
    pb::StartSagaRequest {
        saga_id: id.into(),
        service: String::new(),
        definition: Some(pb::SagaDefinition {
            branches,
            concurrent: false,
            timeout_ms: 0,
        }),
    }
}

async fn finished(c: &Cluster, id: &str) -> TestResult<pb::Saga> {
    let s = c.producer_client().await?;
    eventually(&format!("saga {id} to finish"), || {
        let mut s = s.clone();
        async move {
            // Not there yet: a saga begun with a transaction starts once
            // the coordinator reads its committed start.
            let saga = match s.get_saga(pb::GetSagaRequest { saga_id: id.into() }).await {
                Ok(r) => r.into_inner(),
                Err(e) if e.code() == Code::NotFound => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let done = [
                pb::SagaStatus::Succeeded as i32,
                pb::SagaStatus::Compensated as i32,
            ];
            Ok(done.contains(&saga.status).then_some(saga))
        }
    })
    .await
}

/// The effects in `db` of saga `id`: (branch, op) in the order written.
async fn ledger(db: &SqlitePool, id: &str) -> TestResult<Vec<(String, String)>> {
    Ok(
        sqlx::query_as("SELECT branch, op FROM ledger WHERE saga_id = $1 ORDER BY seq")
            .bind(id)
            .fetch_all(db)
            .await?,
    )
}

/// Calls the app in `db` received for saga `id`'s `branch` and `op`.
async fn calls(db: &SqlitePool, id: &str, branch: &str, op: &str) -> TestResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM branch_calls WHERE saga_id = $1 AND branch = $2 AND op = $3",
    )
    .bind(id)
    .bind(branch)
    .bind(op)
    .fetch_one(db)
    .await?)
}

/// Times the app's insert of its barrier row for `op` conflicted (a repeat
/// or a hanging action reached its transaction and did nothing).
async fn conflicts(db: &SqlitePool, id: &str, branch: &str, op: &str) -> TestResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM barrier_conflicts WHERE saga_id = $1 AND branch = $2 AND op = $3",
    )
    .bind(id)
    .bind(branch)
    .bind(op)
    .fetch_one(db)
    .await?)
}

async fn barrier(db: &SqlitePool, id: &str, branch: &str) -> TestResult<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT op, origin FROM tandem_barrier WHERE saga_id = $1 AND branch = $2 ORDER BY op",
    )
    .bind(id)
    .bind(branch)
    .fetch_all(db)
    .await?)
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.into(), b.into())
}

fn op_state(s: &pb::Saga, branch: usize) -> (pb::BranchOpState, pb::BranchOpState) {
    let b = &s.branches[branch];
    (
        b.action.clone().unwrap_or_default(),
        b.compensation.clone().unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_runs_its_branches_in_order_across_services_each_once() -> TestResult {
    let c = Cluster::start().await?;
    let mut s = c.producer_client().await?;
    let req = start(
        "s-ok",
        vec![
            branch("order", "orders", ""),
            branch("stock", "cart", "action-raise=2"),
            branch("confirm", "orders", ""),
        ],
    );
    let first = s.start_saga(req.clone()).await?.into_inner();
    assert_eq!(first.service, "orders", "the sidecar names its own service");
    // Starting again with the same definition answers the same saga.
    let again = s.start_saga(req).await?.into_inner();
    assert_eq!(again.saga_id, "s-ok");
    assert_eq!(again.started_ms, first.started_ms);

    let saga = finished(&c, "s-ok").await?;
    assert_eq!(saga.status, pb::SagaStatus::Succeeded as i32, "{saga:?}");
    let (orders, cart) = (c.producer_db().await?, c.consumer_db().await?);
    assert_eq!(
        ledger(&orders, "s-ok").await?,
        vec![pair("order", "action"), pair("confirm", "action")]
    );
    assert_eq!(ledger(&cart, "s-ok").await?, vec![pair("stock", "action")]);
    // The raising action was called three times, counted as two failures.
    assert_eq!(calls(&cart, "s-ok", "stock", "action").await?, 3);
    let (action, comp) = op_state(&saga, 1);
    assert_eq!((action.calls, action.failures), (3, 2), "{action:?}");
    assert_eq!(comp.status, pb::BranchOpStatus::Pending as i32);
    assert!(action.error.contains("raises"), "{action:?}");
    c.done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_failure_compensates_what_ran_in_reverse_and_skips_what_never_ran() -> TestResult
{
    let c = Cluster::start().await?;
    let mut s = c.producer_client().await?;
    s.start_saga(start(
        "s-fail",
        vec![
            branch("a", "orders", ""),
            branch("b", "orders", "comp-raise=2"),
            branch("pay", "orders", "fail"),
            branch("ship", "cart", ""),
        ],
    ))
    .await?;
    let saga = finished(&c, "s-fail").await?;
    assert_eq!(saga.status, pb::SagaStatus::Compensated as i32, "{saga:?}");
    assert_eq!(saga.reason, "branch pay failed: declined by the test app");
    let orders = c.producer_db().await?;
    // Compensations in reverse: b before a; pay's action never committed,
    // so its compensation is a null one, recorded by the sidecar without a
    // call to the app.
    assert_eq!(
        ledger(&orders, "s-fail").await?,
        vec![
            pair("a", "action"),
            pair("b", "action"),
            pair("b", "compensation"),
            pair("a", "compensation"),
        ]
    );
    assert_eq!(calls(&orders, "s-fail", "pay", "compensation").await?, 0);
    assert_eq!(
        barrier(&orders, "s-fail", "pay").await?,
        vec![
            pair("action", "compensation"),
            pair("compensation", "compensation")
        ]
    );
    // The failing compensation was retried until it succeeded.
    assert_eq!(calls(&orders, "s-fail", "b", "compensation").await?, 3);
    // ship never ran: never called, recorded as skipped.
    let cart = c.consumer_db().await?;
    assert_eq!(calls(&cart, "s-fail", "ship", "action").await?, 0);
    let (ship, ship_comp) = op_state(&saga, 3);
    assert_eq!(ship.calls, 0);
    assert_eq!(ship_comp.status, pb::BranchOpStatus::Skipped as i32);
    assert_eq!(ship_comp.error, "action never ran");
    c.done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_call_takes_effect_once() -> TestResult {
    // The first call of the action outlives its timeout (500 ms) and is
    // called again while the first is still in the app: both reach the
    // app, the barrier lets one take effect.
    let c = Cluster::start().await?;
    let mut s = c.producer_client().await?;
    let mut slow = branch("stock", "cart", "action-slow=2000");
    slow.timeout_ms = 500;
    slow.max_attempts = 5;
    s.start_saga(start("s-dup", vec![slow, branch("after", "orders", "")]))
        .await?;
    let saga = finished(&c, "s-dup").await?;
    assert_eq!(saga.status, pb::SagaStatus::Succeeded as i32, "{saga:?}");
    let cart = c.consumer_db().await?;
    // Let the first call finish too.
    eventually("the slow first call to end", || {
        let cart = cart.clone();
        async move {
            let n: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM branch_calls WHERE saga_id = 's-dup'")
                    .fetch_one(&cart)
                    .await?;
            Ok((n >= 2).then_some(()))
        }
    })
    .await?;
    eventually("the slow first call to reach its transaction", || {
        let cart = cart.clone();
        async move { Ok((conflicts(&cart, "s-dup", "stock", "action").await? >= 1).then_some(())) }
    })
    .await?;
    assert!(calls(&cart, "s-dup", "stock", "action").await? >= 2);
    assert_eq!(ledger(&cart, "s-dup").await?, vec![pair("stock", "action")]);
    c.done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_arriving_after_its_compensation_is_refused() -> TestResult {
    // Hanging: the action's only call outlives its timeout, the saga gives
    // up and compensates; the compensation finds no committed action and
    // records a null compensation; then the action reaches its transaction
    // and must not take effect.
    let c = Cluster::start().await?;
    let mut s = c.producer_client().await?;
    let mut slow = branch("stock", "cart", "action-slow=2000");
    slow.timeout_ms = 300;
    slow.max_attempts = 1;
    s.start_saga(start("s-hang", vec![branch("order", "orders", ""), slow]))
        .await?;
    let saga = finished(&c, "s-hang").await?;
    assert_eq!(saga.status, pb::SagaStatus::Compensated as i32, "{saga:?}");
    assert!(
        saga.reason
            .starts_with("branch stock gave up after 1 attempts"),
        "{}",
        saga.reason
    );
    let cart = c.consumer_db().await?;
    assert_eq!(calls(&cart, "s-hang", "stock", "action").await?, 1);
    // The action wakes up, reaches its transaction, and does nothing.
    eventually("the late action to reach its transaction", || {
        let cart = cart.clone();
        async move { Ok((conflicts(&cart, "s-hang", "stock", "action").await? == 1).then_some(())) }
    })
    .await?;
    assert_eq!(
        ledger(&cart, "s-hang").await?,
        vec![],
        "the late action took effect"
    );
    assert_eq!(
        barrier(&cart, "s-hang", "stock").await?,
        vec![
            pair("action", "compensation"),
            pair("compensation", "compensation")
        ]
    );
    let orders = c.producer_db().await?;
    assert_eq!(
        ledger(&orders, "s-hang").await?,
        vec![pair("order", "action"), pair("order", "compensation")]
    );
    c.done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_saga_requests_name_their_field_and_change_nothing() -> TestResult {
    let c = Cluster::start().await?;
    let mut co = c.coordinator_client().await?;
    let mut s = c.producer_client().await?;
    let refused = |r: Result<tonic::Response<pb::Saga>, tonic::Status>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    };

    let e = refused(s.start_saga(start("bad", vec![])).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("definition.branches:"),
        "{}",
        e.message()
    );

    let mut b = branch("x", "", "");
    b.service.clear();
    let e = refused(
        s.start_saga(start("bad", vec![branch("a", "orders", ""), b]))
            .await,
    );
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("definition.branches[1].service:"),
        "{}",
        e.message()
    );

    let mut b = branch("b", "orders", "");
    b.after = vec![0];
    let e = refused(
        s.start_saga(start("bad", vec![branch("a", "orders", ""), b]))
            .await,
    );
    assert!(
        e.message().starts_with("definition.branches[1].after:"),
        "{}",
        e.message()
    );

    let e = refused(
        s.start_saga(start("", vec![branch("a", "orders", "")]))
            .await,
    );
    assert!(e.message().starts_with("saga_id:"), "{}", e.message());

    let e = refused(
        co.start_saga(pb::StartSagaRequest {
            definition: None,
            ..start("bad", vec![])
        })
        .await,
    );
    assert!(e.message().starts_with("service:"), "{}", e.message());

    // Nothing was started.
    let e = refused(
        s.get_saga(pb::GetSagaRequest {
            saga_id: "bad".into(),
        })
        .await,
    );
    assert_eq!(e.code(), Code::NotFound);

    // An id names one saga.
    s.start_saga(start("taken", vec![branch("a", "orders", "")]))
        .await?;
    let e = refused(
        s.start_saga(start("taken", vec![branch("a", "cart", "")]))
            .await,
    );
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    let list = co
        .list_sagas(pb::ListSagasRequest {
            status: 0,
            limit: 10,
        })
        .await?
        .into_inner();
    let ids: Vec<&str> = list.sagas.iter().map(|s| s.saga_id.as_str()).collect();
    assert_eq!(ids, vec!["taken"]);
    let e = co
        .list_sagas(pb::ListSagasRequest {
            status: 0,
            limit: 5000,
        })
        .await
        .expect_err("over the limit");
    assert!(e.message().starts_with("limit:"), "{}", e.message());
    c.done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_finishes_after_its_coordinator_and_a_participant_are_killed() -> TestResult {
    let mut c = Cluster::start().await?;
    let mut s = c.producer_client().await?;
    let mut slow = branch("order", "orders", "action-slow=3000");
    slow.timeout_ms = 20_000;
    let mut crashing = branch("stock", "cart", "action-crash");
    crashing.max_attempts = 50;
    crashing.initial_backoff_ms = 100;
    crashing.max_backoff_ms = 500;
    s.start_saga(start(
        "s-crash",
        vec![slow, crashing, branch("pay", "orders", "fail")],
    ))
    .await?;
    let orders = c.producer_db().await?;
    eventually("the first action to be in the app", || {
        let orders = orders.clone();
        async move { Ok((calls(&orders, "s-crash", "order", "action").await? == 1).then_some(())) }
    })
    .await?;
    // The coordinator dies with the call out; a new one calls again.
    c.restart_coordinator(&[])?;
    // The cart app aborts on its first action call; bring it back.
    let cart = c.consumer_db().await?;
    eventually("the cart app to crash in its action", || {
        let cart = cart.clone();
        async move { Ok((calls(&cart, "s-crash", "stock", "action").await? >= 1).then_some(())) }
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.restart_consumer_app(&[])?;
    let saga = finished(&c, "s-crash").await?;
    assert_eq!(saga.status, pb::SagaStatus::Compensated as i32, "{saga:?}");
    tokio::time::sleep(Duration::from_millis(3000)).await; // the first slow call ends
    assert_eq!(
        ledger(&orders, "s-crash").await?,
        vec![pair("order", "action"), pair("order", "compensation")]
    );
    assert_eq!(
        ledger(&cart, "s-crash").await?,
        vec![pair("stock", "action"), pair("stock", "compensation")]
    );
    let (order, _) = op_state(&saga, 0);
    assert!(
        order.calls >= 2,
        "called again after the restart: {order:?}"
    );
    assert!(
        calls(&cart, "s-crash", "stock", "action").await? >= 2,
        "the crashed call was repeated"
    );
    c.done()
}

async fn begin_saga(
    s: &mut tandem_proto::sidecar::sidecar_client::SidecarClient<tonic::transport::Channel>,
    id: &str,
    branches: Vec<pb::SagaBranch>,
) -> Result<String, tonic::Status> {
    Ok(s.begin_saga(tandem_proto::sidecar::BeginSagaRequest {
        saga: Some(start(id, branches)),
        txn_id: String::new(),
        check_mode: 0,
    })
    .await?
    .into_inner()
    .txn_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_begun_with_a_local_transaction_starts_only_if_it_commits() -> TestResult {
    let c = Cluster::start().await?;
    let mut s = c.producer_client().await?;
    let orders = c.producer_db().await?;
    let two = || vec![branch("stock", "cart", ""), branch("ship", "orders", "")];

    // Committed through the sidecar: the saga starts and runs.
    let t1 = begin_saga(&mut s, "s-commit", two()).await?;
    local_transaction(&orders, &t1, "order-1", true).await?;
    s.commit(end(&t1)).await?;
    let saga = finished(&c, "s-commit").await?;
    assert_eq!(saga.status, pb::SagaStatus::Succeeded as i32, "{saga:?}");
    assert_eq!(saga.service, "orders");

    // Rolled back: it never starts.
    let t2 = begin_saga(&mut s, "s-rollback", two()).await?;
    local_transaction(&orders, &t2, "order-2", false).await?;
    s.rollback(end(&t2)).await?;

    // The app committed its local transaction and died before Commit:
    // check-back finds the tandem_txn row, and the saga starts.
    let t3 = begin_saga(&mut s, "s-checked", two()).await?;
    local_transaction(&orders, &t3, "order-3", true).await?;
    let saga = finished(&c, "s-checked").await?;
    assert_eq!(saga.status, pb::SagaStatus::Succeeded as i32, "{saga:?}");

    // The app died before its local transaction committed: check-back
    // rolls it back, and the saga never starts.
    let t4 = begin_saga(&mut s, "s-lost", two()).await?;
    c.expect_state(&t4, pb::TransactionState::RolledBack)
        .await?;
    c.expect_state(&t2, pb::TransactionState::RolledBack)
        .await?;
    for id in ["s-rollback", "s-lost"] {
        let e = s
            .get_saga(pb::GetSagaRequest { saga_id: id.into() })
            .await
            .expect_err("never started");
        assert_eq!(e.code(), Code::NotFound, "{id}");
    }
    let cart = c.consumer_db().await?;
    for id in ["s-rollback", "s-lost"] {
        assert_eq!(calls(&cart, id, "stock", "action").await?, 0, "{id}");
    }

    // A bad saga is refused at BeginSaga, naming the field as sent.
    let mut bad = branch("x", "cart", "");
    bad.action.clear();
    let e = begin_saga(&mut s, "s-bad", vec![bad])
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .starts_with("saga.definition.branches[0].action:"),
        "{}",
        e.message()
    );

    // A restarted coordinator does not start committed sagas twice.
    let mut c = c;
    c.restart_coordinator(&[])?;
    let t5 = begin_saga(&mut c.producer_client().await?, "s-after", two()).await?;
    local_transaction(&orders, &t5, "order-5", true).await?;
    c.producer_client().await?.commit(end(&t5)).await?;
    finished(&c, "s-after").await?;
    for id in ["s-commit", "s-checked", "s-after"] {
        assert_eq!(calls(&cart, id, "stock", "action").await?, 1, "{id}");
    }
    c.done()
}
