//! Transactional messages over real gRPC: half messages stay invisible until
//! committed, outcomes are idempotent and fenced, check-back resolves what
//! the producer never decided (here a test plays the producer's sidecar on
//! its session stream), and open transactions survive a restart.

mod common;

use std::time::Duration;

use common::*;
use tandem_coordinator::{Config, TxnSettings};
use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tokio::sync::mpsc;
use tonic::Code;
use tonic::transport::Channel;

on_both_stores!(
    half_messages_are_invisible_until_committed_and_outcomes_are_fenced,
    check_back_resolves_what_the_producer_never_decided,
    open_transactions_survive_a_restart_and_are_checked_back_after_it,
    a_restart_with_a_backlog_paces_its_check_backs,
    a_reused_transaction_id_with_other_content_is_already_exists,
    a_prepare_repeated_by_the_same_call_is_that_calls_own,
    tandems_own_headers_are_reserved,
    a_retried_publish_appends_once_even_across_a_restart,
    transact_answers_each_item_as_its_own_call_would,
);

fn fast_checks() -> Config {
    Config {
        txn: TxnSettings {
            check_after: Duration::from_millis(300),
            check_timeout: Duration::from_millis(300),
            max_check_interval: Duration::from_millis(600),
            max_checks: 3,
            ..TxnSettings::default()
        },
        ..Config::default()
    }
}

/// As [`fast_checks`], but nothing is due for an hour.
fn no_checks() -> Config {
    Config {
        txn: TxnSettings {
            check_after: Duration::from_secs(3600),
            ..fast_checks().txn
        },
        ..Config::default()
    }
}

async fn prepare(
    c: &mut CoordinatorClient<Channel>,
    service: &str,
    txn: &str,
    value: &str,
) -> TestResult<String> {
    Ok(c.prepare(pb::PrepareRequest {
        instance: String::new(),
        attempt: String::new(),
        service: service.into(),
        txn_id: txn.into(),
        topic: "orders".into(),
        message: Some(msg(Some("k"), value)),
        context: Default::default(),
    })
    .await?
    .into_inner()
    .txn_id)
}

fn end(service: &str, txn: &str) -> pb::EndTransactionRequest {
    pb::EndTransactionRequest {
        service: service.into(),
        txn_id: txn.into(),
    }
}

async fn state(c: &mut CoordinatorClient<Channel>, txn: &str) -> TestResult<pb::Transaction> {
    Ok(
        c.get_transaction(pb::GetTransactionRequest { txn_id: txn.into() })
            .await?
            .into_inner(),
    )
}

/// Plays a producer sidecar: answers check-backs with `answers` in turn
/// (then with the last one forever); `None` means stay silent.
async fn sidecar(
    addr: std::net::SocketAddr,
    service: &str,
    answers: Vec<Option<pb::LocalState>>,
) -> TestResult<tokio::task::JoinHandle<Vec<pb::CheckTransaction>>> {
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
        let mut asked = Vec::new();
        while let Ok(Some(msg)) = stream.message().await {
            let Some(pb::session_response::Kind::Check(check)) = msg.kind else {
                continue;
            };
            let answer = answers
                .get(asked.len())
                .or(answers.last())
                .copied()
                .flatten();
            asked.push(check.clone());
            if let Some(state) = answer {
                let _ = tx
                    .send(pb::SessionRequest {
                        kind: Some(pb::session_request::Kind::CheckResult(pb::CheckResult {
                            check_id: check.check_id,
                            txn_id: check.txn_id,
                            state: state as i32,
                        })),
                    })
                    .await;
            }
        }
        asked
    }))
}

async fn wait_state(
    c: &mut CoordinatorClient<Channel>,
    txn: &str,
    want: pb::TransactionState,
) -> TestResult<pb::Transaction> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let t = state(c, txn).await?;
        if t.state == want as i32 {
            return Ok(t);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("transaction {txn} stayed {:?}", t.state).into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn half_messages_are_invisible_until_committed_and_outcomes_are_fenced(
    backend: Backend,
) -> TestResult {
    let Some(store) = TestStore::new(backend).await? else {
        return Ok(());
    };
    let c = Running::start(&store).await?;
    let mut client = c.client().await?;
    create_topic(&mut client, "orders", 2).await?;
    let mut consumer = Member::join(c.addr, "orders", "cart", SubscribeOpts::default()).await?;

    let t1 = prepare(&mut client, "orders-svc", "t1", "committed").await?;
    let t2 = prepare(&mut client, "orders-svc", "", "rolled back").await?;
    assert!(!t2.is_empty(), "an id is generated");
    // a retried prepare is harmless
    assert_eq!(
        prepare(&mut client, "orders-svc", "t1", "committed").await?,
        "t1"
    );
    assert!(
        consumer
            .next_deliveries(Duration::from_millis(300))
            .await?
            .is_empty(),
        "half messages are invisible"
    );

    let r = client.commit(end("orders-svc", &t1)).await?.into_inner();
    assert_eq!(r.state, pb::TransactionState::Committed as i32);
    let position = r.position.ok_or("position")?;
    client.rollback(end("orders-svc", &t2)).await?;
    let got = consumer.receive(1).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(value(&got[0]), "committed");
    assert_eq!(
        got[0].message.as_ref().map(|m| m.id.as_str()),
        Some("t1"),
        "the message id is the transaction id"
    );
    assert_eq!(
        (got[0].partition, got[0].offset),
        (position.partition, position.offset)
    );
    consumer.ack(&got).await?;

    // repeats are idempotent; the opposite outcome is refused and changes nothing
    let again = client.commit(end("orders-svc", &t1)).await?.into_inner();
    assert_eq!(again.position, Some(position));
    client.rollback(end("orders-svc", &t2)).await?;
    let e = client
        .rollback(end("orders-svc", &t1))
        .await
        .expect_err("rollback after commit");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let e = client
        .commit(end("orders-svc", &t2))
        .await
        .expect_err("commit after rollback");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    // fencing: another service, an unknown id, a malformed id
    let t3 = prepare(&mut client, "orders-svc", "t3", "x").await?;
    let e = client
        .commit(end("cart-svc", &t3))
        .await
        .expect_err("another service");
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert_eq!(
        state(&mut client, &t3).await?.state,
        pb::TransactionState::Prepared as i32
    );
    let e = client
        .commit(end("orders-svc", "nope"))
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = client
        .commit(end("orders-svc", &"x".repeat(300)))
        .await
        .expect_err("malformed");
    assert_eq!(
        (e.code(), e.message().contains("txn_id")),
        (Code::InvalidArgument, true),
        "{e}"
    );
    let e = client.commit(end("", &t3)).await.expect_err("no service");
    assert_eq!(
        (e.code(), e.message().contains("service")),
        (Code::InvalidArgument, true),
        "{e}"
    );
    let e = prepare(&mut client, "cart-svc", "t3", "x")
        .await
        .expect_err("id taken by another service");
    assert!(e.to_string().contains("already exists"), "{e}");
    let big = pb::PrepareRequest {
        instance: String::new(),
        attempt: String::new(),
        service: "orders-svc".into(),
        txn_id: "big".into(),
        topic: "orders".into(),
        message: Some(pb::Message {
            value: vec![0; 2 << 20].into(),
            ..msg(None, "")
        }),
        context: Default::default(),
    };
    let e = client.prepare(big).await.expect_err("over-size");
    assert_eq!(
        (e.code(), e.message().contains("message")),
        (Code::ResourceExhausted, true),
        "{e}"
    );
    let e = client
        .get_transaction(pb::GetTransactionRequest {
            txn_id: "big".into(),
        })
        .await
        .expect_err("nothing stored");
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        consumer
            .next_deliveries(Duration::from_millis(200))
            .await?
            .is_empty(),
        "nothing else delivered"
    );
    let stats = client.get_stats(pb::GetStatsRequest {}).await?.into_inner();
    assert_eq!(
        (
            stats.prepared,
            stats.committed,
            stats.rolled_back,
            stats.open
        ),
        (3, 1, 1, 1)
    );
    consumer.leave().await?;
    c.stop().await
}

async fn check_back_resolves_what_the_producer_never_decided(backend: Backend) -> TestResult {
    let Some(store) = TestStore::new(backend).await? else {
        return Ok(());
    };
    let c = Running::start_with(&store, fast_checks()).await?;
    let mut client = c.client().await?;
    create_topic(&mut client, "orders", 1).await?;
    use pb::LocalState::{Commit, Rollback, Unknown};
    let svc_commit = sidecar(c.addr, "commits", vec![Some(Commit)]).await?;
    let svc_rollback = sidecar(c.addr, "rolls-back", vec![Some(Rollback)]).await?;
    let svc_unsure = sidecar(c.addr, "unsure", vec![Some(Unknown), Some(Commit)]).await?;
    let svc_silent = sidecar(c.addr, "silent", vec![None]).await?;
    prepare(&mut client, "commits", "a", "a").await?;
    prepare(&mut client, "rolls-back", "b", "b").await?;
    prepare(&mut client, "unsure", "c", "c").await?;
    prepare(&mut client, "silent", "d", "d").await?;
    prepare(&mut client, "no-sidecar", "e", "e").await?;

    let a = wait_state(&mut client, "a", pb::TransactionState::Committed).await?;
    assert!(a.resolved_by_check);
    wait_state(&mut client, "b", pb::TransactionState::RolledBack).await?;
    let cc = wait_state(&mut client, "c", pb::TransactionState::Committed).await?;
    assert_eq!(cc.checks, 1, "one UNKNOWN before the COMMIT");
    let d = wait_state(&mut client, "d", pb::TransactionState::RolledBack).await?;
    assert_eq!(d.checks, 3, "max_checks unanswered, then the final action");
    let e = wait_state(&mut client, "e", pb::TransactionState::RolledBack).await?;
    assert_eq!(e.checks, 3);

    let mut m = Member::join(c.addr, "orders", "g", SubscribeOpts::default()).await?;
    let got = m.receive(2).await?;
    let mut values: Vec<String> = got.iter().map(value).collect();
    values.sort();
    assert_eq!(values, vec!["a", "c"]);
    assert!(
        m.next_deliveries(Duration::from_millis(200))
            .await?
            .is_empty()
    );
    let stats = client.get_stats(pb::GetStatsRequest {}).await?.into_inner();
    assert_eq!(
        (stats.resolved_by_check, stats.final_actions, stats.open),
        (5, 2, 0)
    );
    m.leave().await?;
    c.stop().await?;
    let asked = svc_unsure.await?;
    assert_eq!(
        asked.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(
        asked[0].message.as_ref().map(|m| m.value.as_ref()),
        Some(&b"c"[..]),
        "the half message comes with the check"
    );
    for h in [svc_commit, svc_rollback, svc_silent] {
        h.await?;
    }
    Ok(())
}

async fn open_transactions_survive_a_restart_and_are_checked_back_after_it(
    backend: Backend,
) -> TestResult {
    let Some(store) = TestStore::new(backend).await? else {
        return Ok(());
    };
    let c = Running::start_with(&store, no_checks()).await?;
    let mut client = c.client().await?;
    create_topic(&mut client, "orders", 1).await?;
    prepare(&mut client, "svc", "open-1", "one").await?;
    prepare(&mut client, "svc", "open-2", "two").await?;
    prepare(&mut client, "svc", "done", "three").await?;
    client.commit(end("svc", "done")).await?;
    c.stop().await?;

    // after the restart, check-backs are due at once (check_after has passed)
    let c = Running::start_with(&store, fast_checks()).await?;
    let mut client = c.client().await?;
    let answers = sidecar(c.addr, "svc", vec![Some(pb::LocalState::Commit)]).await?;
    assert_eq!(
        client.commit(end("svc", "done")).await?.into_inner().state,
        pb::TransactionState::Committed as i32
    );
    client.rollback(end("svc", "open-2")).await?;
    wait_state(&mut client, "open-1", pb::TransactionState::Committed).await?;
    let mut m = Member::join(c.addr, "orders", "g", SubscribeOpts::default()).await?;
    let got = m.receive(2).await?;
    let values: Vec<String> = got.iter().map(value).collect();
    assert_eq!(values, vec!["three", "one"]);
    assert!(
        m.next_deliveries(Duration::from_millis(200))
            .await?
            .is_empty(),
        "rolled back never delivered"
    );
    m.leave().await?;
    c.stop().await?;
    let asked = answers.await?;
    assert_eq!(
        asked.iter().map(|c| c.txn_id.as_str()).collect::<Vec<_>>(),
        vec!["open-1"]
    );
    Ok(())
}

/// A restart with a backlog of overdue transactions asks about them at
/// `max_check_rate` per second (here 20, with bursts of a tenth of a
/// second's worth), each once, rather than all at once.
async fn a_restart_with_a_backlog_paces_its_check_backs(backend: Backend) -> TestResult {
    let Some(store) = TestStore::new(backend).await? else {
        return Ok(());
    };
    let c = Running::start_with(&store, no_checks()).await?;
    let mut client = c.client().await?;
    create_topic(&mut client, "orders", 1).await?;
    let ids: Vec<String> = (0..60).map(|i| format!("backlog-{i:02}")).collect();
    for id in &ids {
        prepare(&mut client, "svc", id, id).await?;
    }
    c.stop().await?;

    let mut config = fast_checks();
    config.txn.max_check_rate = 20;
    let c = Running::start_with(&store, config).await?;
    let mut client = c.client().await?;
    // A producer's sidecar that commits everything it is asked about and
    // notes when each question came.
    let mut session = c.client().await?;
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::SessionRequest {
        kind: Some(pb::session_request::Kind::Hello(pb::Hello {
            service: "svc".into(),
            instance: "test".into(),
        })),
    })
    .await?;
    let mut stream = session
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let asked = tokio::spawn(async move {
        let mut asked = Vec::new();
        while let Ok(Some(msg)) = stream.message().await {
            let Some(pb::session_response::Kind::Check(check)) = msg.kind else {
                continue;
            };
            asked.push((tokio::time::Instant::now(), check.txn_id.clone()));
            let _ = tx
                .send(pb::SessionRequest {
                    kind: Some(pb::session_request::Kind::CheckResult(pb::CheckResult {
                        check_id: check.check_id,
                        txn_id: check.txn_id,
                        state: pb::LocalState::Commit as i32,
                    })),
                })
                .await;
        }
        asked
    });
    for id in &ids {
        wait_state(&mut client, id, pb::TransactionState::Committed).await?;
    }
    c.stop().await?;
    let asked = asked.await?;
    let mut names: Vec<&str> = asked.iter().map(|(_, id)| id.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ids, "each asked about once");
    // No second holds more than 20 plus the burst of 2 (one more for the
    // window's edges).
    for (i, (start, _)) in asked.iter().enumerate() {
        let within = asked[i..]
            .iter()
            .take_while(|(t, _)| *t < *start + Duration::from_secs(1))
            .count();
        assert!(within <= 23, "{within} check-backs within a second");
    }
    Ok(())
}

/// Identity: a retried Prepare with the same content is the same
/// transaction; the same id with other content is refused and changes
/// nothing (before, it was answered OK and its message silently dropped).
async fn a_reused_transaction_id_with_other_content_is_already_exists(
    backend: Backend,
) -> TestResult {
    let Some(store) = TestStore::new(backend).await? else {
        return Ok(());
    };
    let c = Running::start(&store).await?;
    let mut client = c.client().await?;
    create_topic(&mut client, "orders", 2).await?;
    create_topic(&mut client, "payments", 2).await?;
    prepare(&mut client, "svc", "t1", "first").await?;
    let first = state(&mut client, "t1").await?.prepared_at_ms;
    prepare(&mut client, "svc", "t1", "first").await?;
    assert_eq!(
        state(&mut client, "t1").await?.prepared_at_ms,
        first,
        "an identical retry is idempotent"
    );
    let e = prepare(&mut client, "svc", "t1", "second")
        .await
        .expect_err("other value");
    let status = e.downcast_ref::<tonic::Status>().ok_or("a status")?;
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(status.message().contains("t1"), "{status:?}");
    let other_topic = client
        .prepare(pb::PrepareRequest {
            instance: String::new(),
            attempt: String::new(),
            service: "svc".into(),
            txn_id: "t1".into(),
            topic: "payments".into(),
            message: Some(msg(Some("k"), "first")),
            context: Default::default(),
        })
        .await
        .expect_err("other topic");
    assert_eq!(other_topic.code(), Code::AlreadyExists);
    client.commit(end("svc", "t1")).await?;
    let e = prepare(&mut client, "svc", "t1", "third")
        .await
        .expect_err("finished, other value");
    let status = e.downcast_ref::<tonic::Status>().ok_or("a status")?;
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let mut m = Member::join(c.addr, "orders", "g", SubscribeOpts::default()).await?;
    let got = m.receive(1).await?;
    assert_eq!(
        value(&got[0]),
        "first",
        "the first content is what is delivered"
    );
    assert!(
        got[0]
            .message
            .as_ref()
            .is_some_and(|m| m.headers.iter().all(|h| !h.name.starts_with("tandem."))),
        "Tandem's marker header is not shown to consumers"
    );
    assert!(
        m.next_deliveries(Duration::from_millis(300))
            .await?
            .is_empty()
    );
    Ok(())
}

/// Tandem's own headers (a transaction's marker, a chosen id's mark): a
/// publish that sets one is refused, naming the field, and appends
/// nothing; a message published with an id of its own is delivered
/// without the mark.
async fn tandems_own_headers_are_reserved(backend: Backend) -> TestResult {
    let Some(store) = TestStore::new(backend).await? else {
        return Ok(());
    };
    let c = Running::start(&store).await?;
    let mut client = c.client().await?;
    create_topic(&mut client, "orders", 1).await?;
    for name in ["tandem.txn", "tandem.dedup"] {
        let mut m = msg(Some("k"), "v");
        m.headers.push(pb::Header {
            name: name.into(),
            value: "forged".into(),
        });
        let e = client
            .publish(pb::PublishRequest {
                topic: "orders".into(),
                messages: vec![m],
            })
            .await
            .expect_err("reserved header");
        assert_eq!(e.code(), Code::InvalidArgument, "{name}");
        assert!(e.message().contains("messages[0].headers[0].name"), "{e:?}");
    }
    let mut chosen = msg(Some("k"), "v");
    chosen.id = "mine".into();
    chosen.headers.push(pb::Header {
        name: "app".into(),
        value: "1".into(),
    });
    publish(&mut client, "orders", vec![chosen.clone()]).await?;
    let earliest = SubscribeOpts {
        earliest: true,
        ..SubscribeOpts::default()
    };
    let mut m = Member::join(c.addr, "orders", "g", earliest).await?;
    let got = m.next_deliveries(Duration::from_secs(5)).await?;
    let got: Vec<_> = got.iter().filter_map(|d| d.message.clone()).collect();
    assert_eq!(got.len(), 1, "only the message published: {got:?}");
    assert_eq!(got[0].headers, chosen.headers, "delivered as published");
    assert_eq!(got[0].id, "mine");
    Ok(())
}

/// A producer's retry after a lost acknowledgement: the same ids again.
/// The retry appends nothing and gets the first positions, also after a
/// restart; the same id with other content, or an id shared between a
/// transaction and a plain message, is ALREADY_EXISTS and changes nothing.
async fn a_retried_publish_appends_once_even_across_a_restart(backend: Backend) -> TestResult {
    let Some(store) = TestStore::new(backend).await? else {
        return Ok(());
    };
    let c = Running::start(&store).await?;
    let mut client = c.client().await?;
    create_topic(&mut client, "orders", 2).await?;
    let with_id = |id: &str, key: &str, value: &str| pb::Message {
        id: id.into(),
        ..msg(Some(key), value)
    };
    let batch = vec![with_id("p1", "a", "one"), with_id("p2", "b", "two")];
    let first = publish(&mut client, "orders", batch.clone()).await?;
    let retry = publish(&mut client, "orders", batch.clone()).await?;
    assert_eq!(retry, first, "a retry is answered with the first positions");
    let hwm = |c: &mut CoordinatorClient<Channel>| {
        let mut c = c.clone();
        async move {
            let d = c
                .describe_topic(pb::DescribeTopicRequest {
                    name: "orders".into(),
                })
                .await?
                .into_inner();
            TestResult::Ok(d.partitions.iter().map(|p| p.high_water_mark).sum::<u64>())
        }
    };
    assert_eq!(hwm(&mut client).await?, 2, "nothing appended twice");

    // other content under a used id: refused, and the new id beside it in
    // the same request is not appended either
    let e = client
        .publish(pb::PublishRequest {
            topic: "orders".into(),
            messages: vec![with_id("p3", "c", "three"), with_id("p2", "b", "changed")],
        })
        .await
        .expect_err("other content");
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("messages[1].id"), "{e:?}");
    assert_eq!(hwm(&mut client).await?, 2);

    // ids of transactions and of plain messages do not mix
    prepare(&mut client, "svc", "t1", "txn").await?;
    let e = client
        .publish(pb::PublishRequest {
            topic: "orders".into(),
            messages: vec![with_id("t1", "k", "txn")],
        })
        .await
        .expect_err("a transaction's id");
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = prepare(&mut client, "svc", "p1", "one")
        .await
        .expect_err("a published id");
    let status = e.downcast_ref::<tonic::Status>().ok_or("a status")?;
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(hwm(&mut client).await?, 2);

    // an id the coordinator made up is not held: a publish choosing it is
    // a new message, before a restart as after one
    let made_up = publish(&mut client, "orders", vec![msg(Some("g"), "made up")]).await?;
    let made_up = made_up[0].id.clone();
    publish(
        &mut client,
        "orders",
        vec![with_id(&made_up, "g", "chosen")],
    )
    .await?;
    assert_eq!(hwm(&mut client).await?, 4);
    let made_up_later = publish(&mut client, "orders", vec![msg(Some("g"), "made up")]).await?;
    let made_up_later = made_up_later[0].id.clone();
    assert_eq!(hwm(&mut client).await?, 5);

    c.stop().await?;
    let c = Running::start(&store).await?;
    let mut client = c.client().await?;
    let retry = publish(&mut client, "orders", batch).await?;
    assert_eq!(retry, first, "the window survives a restart");
    assert_eq!(hwm(&mut client).await?, 5);
    publish(
        &mut client,
        "orders",
        vec![with_id(&made_up_later, "g", "chosen")],
    )
    .await?;
    assert_eq!(
        hwm(&mut client).await?,
        6,
        "a made-up id is not held after a restart"
    );
    // without an id of its own a message is simply appended each time
    publish(&mut client, "orders", vec![msg(Some("a"), "one")]).await?;
    publish(&mut client, "orders", vec![msg(Some("a"), "one")]).await?;
    assert_eq!(hwm(&mut client).await?, 8);
    // ids chosen and not in one request: a retry appends only the ones
    // without, and answers the chosen ones with their first positions
    let mixed = vec![
        with_id("p4", "a", "four"),
        msg(Some("b"), "no id"),
        with_id("p5", "c", "five"),
    ];
    let first = publish(&mut client, "orders", mixed.clone()).await?;
    assert_eq!(hwm(&mut client).await?, 11);
    let retry = publish(&mut client, "orders", mixed).await?;
    assert_eq!(
        (&retry[0], &retry[2]),
        (&first[0], &first[2]),
        "chosen ids keep their positions"
    );
    assert_ne!(retry[1], first[1], "the message without an id is new");
    assert_eq!(hwm(&mut client).await?, 12);
    c.stop().await
}

/// A caller that lost the answer to its Prepare and sends it again (the
/// same attempt) is told the transaction is its own (existed = false);
/// another call with the same id and content is told it existed.
async fn a_prepare_repeated_by_the_same_call_is_that_calls_own(backend: Backend) -> TestResult {
    let Some(store) = TestStore::new(backend).await? else {
        return Ok(());
    };
    let c = Running::start(&store).await?;
    let mut client = c.client().await?;
    create_topic(&mut client, "orders", 1).await?;
    let req = |attempt: &str| pb::PrepareRequest {
        instance: String::new(),
        attempt: attempt.into(),
        service: "svc".into(),
        txn_id: "t1".into(),
        topic: "orders".into(),
        message: Some(msg(Some("k"), "v")),
        context: Default::default(),
    };
    let first = client.prepare(req("call-1")).await?.into_inner();
    assert!(!first.existed);
    let again = client.prepare(req("call-1")).await?.into_inner();
    assert!(!again.existed, "the same call: {again:?}");
    assert_eq!(again.prepared_at_ms, first.prepared_at_ms);
    // Still so after a restart (on PostgreSQL: as another replica would
    // find it after a takeover).
    c.stop().await?;
    let c = Running::start(&store).await?;
    let mut client = c.client().await?;
    let after = client.prepare(req("call-1")).await?.into_inner();
    assert!(!after.existed, "the same call after a restart: {after:?}");
    let other = client.prepare(req("call-2")).await?.into_inner();
    assert!(other.existed, "another call: {other:?}");
    let anonymous = client.prepare(req("")).await?.into_inner();
    assert!(anonymous.existed, "no attempt named: {anonymous:?}");
    // Once decided, even the same call is told it existed (with the outcome).
    client.rollback(end("svc", "t1")).await?;
    let decided = client.prepare(req("call-1")).await?.into_inner();
    assert!(decided.existed, "{decided:?}");
    assert_eq!(decided.state, pb::TransactionState::RolledBack as i32);
    let err = client
        .prepare(req("bad\u{1}"))
        .await
        .expect_err("a control character");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("attempt"), "{err:?}");
    c.stop().await
}

async fn transact_answers_each_item_as_its_own_call_would(backend: Backend) -> TestResult {
    use pb::transact_item::Kind;
    use pb::transact_result::Kind as Answer;
    let Some(store) = TestStore::new(backend).await? else {
        return Ok(());
    };
    let c = Running::start(&store).await?;
    let mut client = c.client().await?;
    create_topic(&mut client, "orders", 2).await?;
    let mut consumer = Member::join(c.addr, "orders", "cart", SubscribeOpts::default()).await?;
    let req = |txn: &str, topic: &str, value: &str| pb::PrepareRequest {
        instance: String::new(),
        attempt: String::new(),
        service: "svc".into(),
        txn_id: txn.into(),
        topic: topic.into(),
        message: Some(msg(Some("k"), value)),
        context: Default::default(),
    };
    let item = |kind| pb::TransactItem { kind: Some(kind) };
    let results = client
        .transact(pb::TransactRequest {
            items: vec![
                item(Kind::Prepare(req("t1", "orders", "one"))),
                item(Kind::Prepare(req("t2", "orders", "two"))),
                item(Kind::Prepare(req("t3", "nosuch", "three"))),
                pb::TransactItem { kind: None },
                item(Kind::Commit(end("svc", "never-prepared"))),
            ],
        })
        .await?
        .into_inner()
        .results;
    let codes: Vec<Code> = results.iter().map(|r| Code::from_i32(r.code)).collect();
    let unary = client
        .prepare(req("t3", "nosuch", "three"))
        .await
        .expect_err("unknown topic");
    let unary_commit = client
        .commit(end("svc", "never-prepared"))
        .await
        .expect_err("never prepared");
    assert_eq!(
        codes,
        [
            Code::Ok,
            Code::Ok,
            unary.code(),
            Code::InvalidArgument,
            unary_commit.code()
        ],
        "{results:?}"
    );
    assert_eq!(results[2].message, unary.message());
    assert!(results[3].message.contains("items[3]"), "{results:?}");
    assert!(matches!(&results[0].kind, Some(Answer::Prepare(p)) if p.txn_id == "t1" && !p.existed));
    // Nothing prepared by the failed items; the good ones are half messages.
    assert_eq!(
        state(&mut client, "t1").await?.state,
        pb::TransactionState::Prepared as i32
    );
    assert!(
        client
            .get_transaction(pb::GetTransactionRequest {
                txn_id: "t3".into()
            })
            .await
            .is_err()
    );
    assert!(
        consumer
            .next_deliveries(Duration::from_millis(300))
            .await?
            .is_empty(),
        "half messages are invisible"
    );
    // Outcomes in one call: t1 committed and delivered, t2 rolled back.
    let results = client
        .transact(pb::TransactRequest {
            items: vec![
                item(Kind::Commit(end("svc", "t1"))),
                item(Kind::Rollback(end("svc", "t2"))),
                item(Kind::Rollback(end("other-svc", "t1"))),
            ],
        })
        .await?
        .into_inner()
        .results;
    assert_eq!(results[0].code, 0, "{results:?}");
    assert_eq!(results[1].code, 0, "{results:?}");
    assert_eq!(
        Code::from_i32(results[2].code),
        Code::PermissionDenied,
        "{results:?}"
    );
    assert!(
        matches!(&results[0].kind, Some(Answer::End(e)) if e.state == pb::TransactionState::Committed as i32)
    );
    let got = consumer.receive(1).await?;
    assert_eq!(value(&got[0]), "one");
    assert!(
        consumer
            .next_deliveries(Duration::from_millis(300))
            .await?
            .is_empty(),
        "the rolled-back message is never delivered"
    );
    // A call with no items changes nothing and says which field.
    let e = client
        .transact(pb::TransactRequest { items: vec![] })
        .await
        .expect_err("no items");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("items"), "{e:?}");
    c.stop().await
}
