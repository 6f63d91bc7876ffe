//! The operator's commands of the real `tandem` binary against a real
//! coordinator (and, for the dead letters, a real sidecar in front of an
//! app in this process): each with `--json`, checked against what was done.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_examples::process::Process;
use tandem_proto::app as app_pb;
use tandem_proto::coordinator as pb;
use tandem_proto::sidecar as sc;
use tonic::{Request, Response, Status};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

/// Runs `tandem --coordinator URL args…` with `input` on standard input;
/// returns whether it succeeded, its standard output and its standard error.
fn run(url: &str, args: &[&str], input: &str) -> TestResult<(bool, String, String)> {
    use std::io::Write;
    let mut child = Command::new(TANDEM)
        .arg("--coordinator")
        .arg(url)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

/// `tandem args… --json`, which must succeed; its JSON document.
fn json(url: &str, args: &[&str]) -> TestResult<Value> {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, out, err) = run(url, &all, "")?;
    if !ok {
        return Err(format!("tandem {all:?} failed: {err}").into());
    }
    Ok(serde_json::from_str(&out)?)
}

fn start_coordinator(dir: &Path) -> TestResult<Process> {
    let args: Vec<String> = [
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &dir.join("coordinator").display().to_string(),
        "--set",
        "metrics_listen=off",
        // Check-backs late enough that a prepared transaction stays
        // prepared, with its next check ahead, while the test looks.
        "--set",
        "check_after_ms=60000",
    ]
    .map(str::to_owned)
    .to_vec();
    Ok(Process::start(
        "coordinator",
        Path::new(TANDEM),
        &args,
        &[],
        dir,
    )?)
}

/// A client of the coordinator at `url`, with a topic `name` of one
/// partition created.
async fn client_with_topic(
    url: &str,
    name: &str,
) -> TestResult<pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>> {
    let mut c = pb::coordinator_client::CoordinatorClient::connect(url.to_owned()).await?;
    c.create_topic(pb::CreateTopicRequest {
        name: name.into(),
        partitions: 1,
    })
    .await?;
    Ok(c)
}

/// A member `holder` of `group` on `topic`, with no credit, once it has
/// its assignment: its request sender (dropping it leaves) and its stream.
async fn join(
    c: &mut pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
    topic: &str,
    group: &str,
) -> TestResult<(
    tokio::sync::mpsc::Sender<pb::ConsumeRequest>,
    tonic::Streaming<pb::ConsumeResponse>,
)> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::ConsumeRequest {
        kind: Some(pb::consume_request::Kind::Subscribe(pb::Subscribe {
            topic: topic.into(),
            group: group.into(),
            client_id: "holder".into(),
            ..Default::default()
        })),
    })
    .await?;
    let mut stream = c
        .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    stream.message().await?.ok_or("no assignment")?;
    Ok((tx, stream))
}

fn values(v: &Value) -> Vec<String> {
    v["messages"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| m["value"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[test]
fn publish_read_and_find_messages_with_keys_headers_and_times() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coordinator = start_coordinator(dir.path())?;
    let url = coordinator.url();
    run(
        &url,
        &["topic", "create", "events", "--partitions", "2"],
        "",
    )?;

    // Lines as JSON objects, each with its own id, key and headers.
    let lines = [
        r#"{"id": "e-1", "key": "k", "value": "one", "headers": [{"name": "trace", "value": "t1"}]}"#,
        r#"{"id": "e-2", "key": "k", "value": {"base64": "/w=="}}"#,
    ];
    let (ok, out, err) = run(&url, &["publish", "events", "--json"], &lines.join("\n"))?;
    assert!(ok, "publish --json failed: {err}");
    let positions: Vec<&str> = out.lines().collect();
    assert_eq!(positions.len(), 2, "one position per line: {out:?}");
    assert_eq!(
        positions[0].split(' ').next(),
        positions[1].split(' ').next(),
        "one key, one partition"
    );
    let partition = positions[0].split(' ').next().ok_or("partition")?;
    std::thread::sleep(Duration::from_millis(50));
    let between = now_ms();
    std::thread::sleep(Duration::from_millis(50));
    // Plain lines with --key and --header on each.
    let (ok, _, err) = run(
        &url,
        &[
            "publish",
            "events",
            "--key",
            "k",
            "--header",
            "origin=cli",
            "--header",
            "empty=",
        ],
        "three\n",
    )?;
    assert!(ok, "publish --header failed: {err}");

    let read = json(&url, &["read", "events", "--partition", partition])?;
    let messages = read["messages"].as_array().ok_or("messages")?;
    assert_eq!(messages.len(), 3, "{read}");
    assert_eq!(messages[0]["id"], "e-1");
    assert_eq!(messages[0]["key"], "k");
    assert_eq!(messages[0]["value"], "one");
    assert_eq!(messages[0]["headers"][0]["name"], "trace");
    assert_eq!(messages[0]["headers"][0]["value"], "t1");
    assert_eq!(messages[1]["value"]["base64"], "/w==", "not UTF-8: base64");
    assert_eq!(messages[2]["value"], "three");
    assert_eq!(
        messages[2]["headers"],
        serde_json::json!([{"name": "origin", "value": "cli"}, {"name": "empty", "value": ""}])
    );
    assert_eq!(read["partitions"][0]["high_water_mark"], 3);
    // Without --partition: every partition (the other one is empty).
    let all = json(&url, &["read", "events"])?;
    assert_eq!(all["messages"].as_array().map(Vec::len), Some(3), "{all}");
    assert_eq!(all["partitions"].as_array().map(Vec::len), Some(2), "{all}");

    // From an offset, from a time, and a bad request.
    let from1 = json(
        &url,
        &["read", "events", "--partition", partition, "--offset", "1"],
    )?;
    assert_eq!(from1["messages"].as_array().map(Vec::len), Some(2));
    let since = json(
        &url,
        &[
            "read",
            "events",
            "--partition",
            partition,
            "--since",
            &between.to_string(),
        ],
    )?;
    assert_eq!(values(&since), ["three"], "{since}");
    let (ok, _, err) = run(&url, &["read", "events", "--partition", "7"], "")?;
    assert!(!ok && err.contains("partition 7 does not exist"), "{err}");

    // By id, in whichever partition it is.
    let found = json(&url, &["read", "events", "--id", "e-2"])?;
    assert_eq!(found["offset"], 1);
    assert_eq!(found["partition"].to_string(), partition);
    // An id the coordinator generated is remembered nowhere: found by
    // reading the partitions.
    let generated = messages[2]["id"].as_str().ok_or("generated id")?;
    let found = json(&url, &["read", "events", "--id", generated])?;
    assert_eq!(found["value"], "three");
    let (ok, _, err) = run(&url, &["read", "events", "--id", "nope"], "")?;
    assert!(!ok && err.contains("NotFound"), "{err}");

    // A bad JSON line stops the publish at that line, naming it, and what
    // came before it in the same batch is not published.
    let (ok, out, err) = run(
        &url,
        &["publish", "events", "--json"],
        "{\"value\": \"x\"}\n{\"valu\": 1}\n",
    )?;
    assert!(
        !ok && err.contains("line 2") && out.is_empty(),
        "{out} {err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_are_listed_with_state_age_and_next_check() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coordinator = start_coordinator(dir.path())?;
    let url = coordinator.url();
    let mut c = client_with_topic(&url, "orders").await?;
    for id in ["t-open", "t-done", "t-other"] {
        c.prepare(pb::PrepareRequest {
            service: if id == "t-other" { "billing" } else { "orders" }.into(),
            txn_id: id.into(),
            topic: "orders".into(),
            message: Some(pb::Message {
                value: bytes::Bytes::from_static(b"v"),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
        // Prepared in distinct milliseconds: the list's order is theirs.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    c.commit(pb::EndTransactionRequest {
        service: "orders".into(),
        txn_id: "t-done".into(),
    })
    .await?;
    let u = url.clone();
    let (all, prepared, billing, shown, bad) = tokio::task::spawn_blocking(move || {
        TestResult::Ok((
            json(&u, &["txn", "list"])?,
            json(
                &u,
                &["txn", "list", "--state", "prepared", "--service", "orders"],
            )?,
            json(&u, &["txn", "list", "--service", "billing", "--limit", "1"])?,
            json(&u, &["txn", "show", "t-done"])?,
            run(&u, &["txn", "list", "--state", "half"], "")?,
        ))
    })
    .await??;
    let ids = |v: &Value| -> Vec<String> {
        v["transactions"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|t| t["txn_id"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(ids(&all), ["t-open", "t-done", "t-other"], "oldest first");
    assert_eq!(all["matched"], 3);
    assert_eq!(ids(&prepared), ["t-open"]);
    let open = &prepared["transactions"][0];
    assert_eq!(open["state"], "prepared");
    assert_eq!(open["checks"], 0);
    let next = open["next_check_at_ms"].as_i64().ok_or("next check")?;
    let at = open["prepared_at_ms"].as_i64().ok_or("prepared at")?;
    assert!(
        next >= at + 50_000,
        "the first check is due check_after_ms after the prepare: {open}"
    );
    assert!(open["age_ms"].as_i64().is_some_and(|a| a >= 0));
    assert_eq!(ids(&billing), ["t-other"]);
    assert_eq!(shown["state"], "committed");
    assert_eq!(shown["offset"], 0);
    assert!(shown["next_check_at_ms"].is_null());
    assert!(shown["finished_at_ms"].as_i64().is_some_and(|f| f >= at));
    assert!(!bad.0 && bad.2.contains("--state"), "{}", bad.2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_listed_reset_and_replayed_only_without_members() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coordinator = start_coordinator(dir.path())?;
    let url = coordinator.url();
    let u = url.clone();
    tokio::task::spawn_blocking(move || -> TestResult {
        run(&u, &["topic", "create", "jobs", "--partitions", "2"], "")?;
        let (ok, _, err) = run(&u, &["publish", "jobs"], "a\nb\nc\nd\n")?;
        assert!(ok, "{err}");
        Ok(())
    })
    .await??;
    let middle = now_ms();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let u = url.clone();
    tokio::task::spawn_blocking(move || -> TestResult {
        let (ok, _, err) = run(&u, &["publish", "jobs"], "e\nf\n")?;
        assert!(ok, "{err}");
        // The group reads everything and commits it.
        let (ok, out, err) = run(
            &u,
            &[
                "consume", "jobs", "--group", "workers", "--from", "earliest", "--max", "6",
            ],
            "",
        )?;
        assert!(ok && out.lines().count() == 6, "{out} {err}");
        Ok(())
    })
    .await??;

    let lag = |v: &Value| v["groups"][0]["total_lag"].as_u64();
    let u = url.clone();
    let listed = tokio::task::spawn_blocking(move || json(&u, &["group", "list"])).await??;
    assert_eq!(listed["groups"][0]["group"], "workers", "{listed}");
    assert_eq!(listed["groups"][0]["topic"], "jobs");
    assert_eq!(lag(&listed), Some(0));
    assert_eq!(listed["groups"][0]["members"], serde_json::json!([]));

    // Back to the start: everything is lag again.
    let u = url.clone();
    let (reset, after) = tokio::task::spawn_blocking(move || {
        TestResult::Ok((
            json(
                &u,
                &[
                    "group",
                    "reset",
                    "workers",
                    "--topic",
                    "jobs",
                    "--to-earliest",
                ],
            )?,
            json(&u, &["group", "list", "--topic", "jobs"])?,
        ))
    })
    .await??;
    let moves = reset["moves"].as_array().ok_or("moves")?;
    assert_eq!(moves.len(), 2);
    assert!(moves.iter().all(|m| m["to"] == 0), "{reset}");
    assert_eq!(
        moves.iter().filter_map(|m| m["from"].as_u64()).sum::<u64>(),
        6
    );
    assert_eq!(lag(&after), Some(6));

    // Replay from a time: the two published after it are lag again (from
    // the end: a replay never moves an offset forward, so a group still
    // before that time keeps its place).
    let u = url.clone();
    tokio::task::spawn_blocking(move || {
        json(
            &u,
            &[
                "group",
                "reset",
                "workers",
                "--topic",
                "jobs",
                "--to-latest",
            ],
        )
    })
    .await??;
    let u = url.clone();
    let since = middle.to_string();
    let (replay, replayed, one) = tokio::task::spawn_blocking(move || {
        TestResult::Ok((
            json(
                &u,
                &[
                    "group", "replay", "workers", "--topic", "jobs", "--since", &since,
                ],
            )?,
            json(&u, &["group", "list", "--topic", "jobs"])?,
            json(
                &u,
                &[
                    "group",
                    "reset",
                    "workers",
                    "--topic",
                    "jobs",
                    "--partition",
                    "1",
                    "--to-offset",
                    "1",
                ],
            )?,
        ))
    })
    .await??;
    assert_eq!(replay["moves"].as_array().map(Vec::len), Some(2));
    assert_eq!(lag(&replayed), Some(2), "e and f again: {replay}");
    assert_eq!(one["moves"].as_array().map(Vec::len), Some(1));
    assert_eq!(one["moves"][0]["partition"], 1);
    assert_eq!(one["moves"][0]["to"], 1);
    // A replay never moves an offset forward (partition 1 is now before
    // wherever `middle` falls in it, or at it).
    let u = url.clone();
    let since = middle.to_string();
    let again = tokio::task::spawn_blocking(move || {
        json(
            &u,
            &[
                "group", "replay", "workers", "--topic", "jobs", "--since", &since,
            ],
        )
    })
    .await??;
    for m in again["moves"].as_array().ok_or("moves")? {
        assert!(m["to"].as_u64() <= m["from"].as_u64(), "forward: {again}");
    }

    // While a member is in the group, a reset is refused and moves nothing.
    let mut c = pb::coordinator_client::CoordinatorClient::connect(url.clone()).await?;
    let before = c
        .describe_topic(pb::DescribeTopicRequest {
            name: "jobs".into(),
        })
        .await?
        .into_inner();
    let (tx, mut stream) = join(&mut c, "jobs", "workers").await?;
    let u = url.clone();
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        run(
            &u,
            &[
                "group",
                "reset",
                "workers",
                "--topic",
                "jobs",
                "--to-latest",
            ],
            "",
        )
    })
    .await??;
    assert!(
        !ok && err.contains("FailedPrecondition") && err.contains("holder"),
        "{err}"
    );
    let now = c
        .describe_topic(pb::DescribeTopicRequest {
            name: "jobs".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        before.groups[0].partitions, now.groups[0].partitions,
        "a refused reset moves nothing"
    );

    // More partitions: the live member is handed the new one at once; fewer
    // are refused, naming the field.
    let u = url.clone();
    let (grown, fewer) = tokio::task::spawn_blocking(move || {
        TestResult::Ok((
            json(
                &u,
                &["topic", "add-partitions", "jobs", "--partitions", "3"],
            )?,
            run(
                &u,
                &["topic", "add-partitions", "jobs", "--partitions", "2"],
                "",
            )?,
        ))
    })
    .await??;
    assert_eq!(grown["previous"], 2);
    assert_eq!(grown["partitions"], 3);
    assert!(
        !fewer.0
            && fewer
                .2
                .contains("partitions: must be more than the topic's 3"),
        "{}",
        fewer.2
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = tokio::time::timeout_at(deadline.into(), stream.message())
            .await
            .map_err(|_| "no assignment with the new partition")??
            .ok_or("stream ended")?;
        if let Some(pb::consume_response::Kind::Assignment(a)) = answer.kind
            && a.partitions.iter().any(|p| p.partition == 2)
        {
            break;
        }
    }
    drop(tx);
    Ok(())
}

/// Runs `tandem args…` for at most 20 s; its standard output, or an error
/// if it failed or did not finish.
fn run_bounded(url: &str, args: &[&str]) -> TestResult<String> {
    let mut child = Command::new(TANDEM)
        .arg("--coordinator")
        .arg(url)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("tandem {args:?} did not finish within 20 s").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(format!(
            "tandem {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A group that consumed a topic before it grew starts the new partitions
/// at their beginning, whatever its start_from: what was published to them
/// while the group was stopped is delivered when it comes back (a
/// "latest" start would skip it).
#[test]
fn a_stopped_group_gets_what_was_published_to_new_partitions() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coordinator = start_coordinator(dir.path())?;
    let url = coordinator.url();
    run(&url, &["topic", "create", "grow", "--partitions", "1"], "")?;
    let (ok, _, err) = run(&url, &["publish", "grow"], "a\n")?;
    assert!(ok, "{err}");
    let first = run_bounded(
        &url,
        &[
            "consume", "grow", "--group", "late", "--from", "earliest", "--max", "1",
        ],
    )?;
    assert_eq!(first.trim(), "a");
    json(
        &url,
        &["topic", "add-partitions", "grow", "--partitions", "2"],
    )?;
    let (ok, _, err) = run(
        &url,
        &["publish", "grow", "--json"],
        "{\"value\": \"x\", \"partition\": 1}\n",
    )?;
    assert!(ok, "{err}");
    // Back, starting from "latest" for partitions it never committed.
    let after = run_bounded(&url, &["consume", "grow", "--group", "late", "--max", "1"])?;
    assert_eq!(after.trim(), "x");
    Ok(())
}

/// An app whose handler fails every message whose value is `poison` for
/// group `cart` until it is healed, and records what it handled.
#[derive(Clone, Default)]
struct App {
    healed: Arc<Mutex<bool>>,
    handled: Arc<Mutex<Vec<(String, String, String)>>>,
}

#[tonic::async_trait]
impl app_pb::app_server::App for App {
    async fn execute_local_transaction(
        &self,
        _: Request<app_pb::ExecuteLocalTransactionRequest>,
    ) -> Result<Response<app_pb::LocalTransactionResponse>, Status> {
        Err(Status::unimplemented("no transactions here"))
    }

    async fn check_local_transaction(
        &self,
        _: Request<app_pb::CheckLocalTransactionRequest>,
    ) -> Result<Response<app_pb::LocalTransactionResponse>, Status> {
        Err(Status::unimplemented("no transactions here"))
    }

    async fn handle_message(
        &self,
        req: Request<app_pb::HandleMessageRequest>,
    ) -> Result<Response<app_pb::HandleMessageResponse>, Status> {
        let req = req.into_inner();
        let m = req.message.unwrap_or_default();
        let value = String::from_utf8_lossy(&m.value).into_owned();
        let healed = *self.healed.lock().unwrap_or_else(PoisonError::into_inner);
        if value == "poison" && req.group == "cart" && !healed {
            return Err(Status::internal("cannot digest poison"));
        }
        self.handled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((req.group, m.id, value));
        Ok(Response::new(app_pb::HandleMessageResponse {}))
    }

    async fn handle_messages(
        &self,
        _: Request<app_pb::HandleMessagesRequest>,
    ) -> Result<Response<app_pb::HandleMessagesResponse>, Status> {
        Err(Status::unimplemented("one at a time"))
    }

    async fn execute_branch(
        &self,
        _: Request<app_pb::BranchRequest>,
    ) -> Result<Response<app_pb::BranchResponse>, Status> {
        Err(Status::unimplemented("no sagas here"))
    }

    async fn compensate_branch(
        &self,
        _: Request<app_pb::BranchRequest>,
    ) -> Result<Response<app_pb::BranchResponse>, Status> {
        Err(Status::unimplemented("no sagas here"))
    }
}

/// Polls `check` every 50 ms for up to 30 s.
async fn eventually<F, Fut>(what: &str, mut check: F) -> TestResult
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = TestResult<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if check().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("timed out waiting for {what}").into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_shown_and_redriven_to_the_group_that_gave_them_up() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coordinator = start_coordinator(dir.path())?;
    let url = coordinator.url();

    let app = App::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = listener.local_addr()?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(app_pb::app_server::AppServer::new(app.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let args: Vec<String> = [
        "sidecar",
        "--listen",
        "127.0.0.1:0",
        "--coordinator",
        &url,
        "--service",
        "cart",
        "--app",
        &format!("http://{app_addr}"),
        "--db",
        &dir.path().join("cart.db").display().to_string(),
        "--set",
        "metrics_listen=off",
    ]
    .map(str::to_owned)
    .to_vec();
    let sidecar = Process::start("sidecar", Path::new(TANDEM), &args, &[], dir.path())?;
    let mut c = client_with_topic(&url, "orders").await?;
    let mut s = sc::sidecar_client::SidecarClient::connect(sidecar.url()).await?;
    for group in ["cart", "audit"] {
        s.subscribe(sc::SubscribeRequest {
            topic: "orders".into(),
            group: group.into(),
            start_from: pb::StartFrom::Earliest as i32,
            max_in_flight: 4,
            max_attempts: 2,
            retry_backoff_ms: 10,
            ..Default::default()
        })
        .await?;
    }
    // A group watching the dead letters themselves.
    s.subscribe(sc::SubscribeRequest {
        topic: "orders.dlq".into(),
        group: "dlq-watch".into(),
        start_from: pb::StartFrom::Earliest as i32,
        max_in_flight: 4,
        max_attempts: 2,
        retry_backoff_ms: 10,
        ..Default::default()
    })
    .await?;
    let msg = |id: &str, value: &str| pb::Message {
        id: id.into(),
        key: Some(bytes::Bytes::from_static(b"k")),
        value: bytes::Bytes::from(value.to_owned()),
        headers: vec![pb::Header {
            name: "trace".into(),
            value: bytes::Bytes::from_static(b"abc"),
        }],
        partition: None,
    };
    c.publish(pb::PublishRequest {
        topic: "orders".into(),
        messages: vec![msg("m-1", "poison"), msg("m-2", "fine")],
    })
    .await?;
    let handled = app.handled.clone();
    let count = move |group: &str, id: &str| {
        handled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(g, i, _)| g == group && i == id)
            .count()
    };
    let c2 = count.clone();
    eventually("the poison dead-lettered and the rest handled", || {
        let mut c = c.clone();
        let count = c2.clone();
        async move {
            let d = c
                .describe_topic(pb::DescribeTopicRequest {
                    name: "orders.dlq".into(),
                })
                .await?
                .into_inner();
            let stored: u64 = d.partitions.iter().map(|p| p.high_water_mark).sum();
            Ok(stored == 1 && count("cart", "m-2") == 1 && count("audit", "m-1") == 1)
        }
    })
    .await?;

    let u = url.clone();
    let shown = tokio::task::spawn_blocking(move || json(&u, &["dlq", "show", "orders"])).await??;
    let letter = &shown["dead_letters"][0];
    assert_eq!(letter["id"], "m-1", "{shown}");
    assert_eq!(letter["group"], "cart");
    assert_eq!(letter["topic"], "orders");
    assert_eq!(letter["offset"], 0);
    assert_eq!(letter["attempts"], 2);
    assert_eq!(letter["value"], "poison");
    assert!(
        letter["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot digest poison")),
        "{letter}"
    );
    assert_eq!(
        letter["headers"],
        serde_json::json!([{"name": "trace", "value": "abc"}]),
        "the app's headers, without the dead letter's own"
    );

    // Redriven while still poison: the cart group fails it again, and its
    // second dead letter reaches the group watching the dead letters (the
    // redrive's addressing is not carried into it); the audit group, which
    // handled the message the first time, passes the redrive by.
    let u = url.clone();
    let first =
        tokio::task::spawn_blocking(move || json(&u, &["dlq", "redrive", "orders"])).await??;
    let redriven = &first["redriven"][0];
    assert_eq!(redriven["group"], "cart", "{first}");
    assert_eq!(redriven["id"], "m-1~r0.0");
    let c3 = count.clone();
    eventually("the second dead letter to reach the watching group", || {
        let count = c3.clone();
        async move {
            Ok(count("dlq-watch", "cart/m-1") == 1 && count("dlq-watch", "cart/m-1~r0.0") == 1)
        }
    })
    .await?;

    // Healed: redriving the second dead letter, the cart group handles it.
    // Redriving the first again appends nothing (same id within the dedup
    // window). A dead letter published by hand, without the headers a
    // sidecar writes, is listed and left alone.
    *app.healed.lock().unwrap_or_else(PoisonError::into_inner) = true;
    c.publish(pb::PublishRequest {
        topic: "orders.dlq".into(),
        messages: vec![msg("junk", "junk")],
    })
    .await?;
    let u = url.clone();
    let (again, second, junk, other) = tokio::task::spawn_blocking(move || {
        TestResult::Ok((
            json(&u, &["dlq", "redrive", "orders", "--limit", "1"])?,
            json(
                &u,
                &["dlq", "redrive", "orders", "--offset", "1", "--limit", "1"],
            )?,
            json(&u, &["dlq", "redrive", "orders", "--offset", "2"])?,
            json(&u, &["dlq", "show", "orders", "--group", "audit"])?,
        ))
    })
    .await??;
    assert_eq!(
        again["redriven"][0]["offset"], redriven["offset"],
        "{again}"
    );
    assert_eq!(second["redriven"][0]["id"], "m-1~r0.0~r0.1", "{second}");
    assert_eq!(junk["redriven"], serde_json::json!([]));
    assert!(
        junk["skipped"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no tandem.group header")),
        "{junk}"
    );
    assert_eq!(other["dead_letters"], serde_json::json!([]));
    let c4 = count.clone();
    eventually("the cart group to handle the redriven poison", || {
        let count = c4.clone();
        async move { Ok(count("cart", "m-1~r0.0~r0.1") == 1) }
    })
    .await?;
    let s2 = s.clone();
    eventually("the audit group to pass both redrives by", || {
        let mut s = s2.clone();
        async move {
            let stats = s.get_stats(sc::GetStatsRequest {}).await?.into_inner();
            Ok(stats.redriven_for_other_groups == 2)
        }
    })
    .await?;
    for id in ["m-1~r0.0", "m-1~r0.0~r0.1"] {
        assert_eq!(count("audit", id), 0, "{id} is not for the audit group");
    }
    let high = c
        .describe_topic(pb::DescribeTopicRequest {
            name: "orders".into(),
        })
        .await?
        .into_inner()
        .partitions[0]
        .high_water_mark;
    assert_eq!(high, 4, "two messages and two redrives");
    drop(sidecar);
    server.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_passes_a_clean_run_and_names_each_planted_inconsistency() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coordinator = start_coordinator(dir.path())?;
    let url = coordinator.url();
    let mut c = client_with_topic(&url, "orders").await?;
    // The producer's and the consumer's tables, as the sidecar's
    // migrations make them.
    let open = |name: &str| {
        let path = dir.path().join(name);
        async move {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true);
            sqlx::SqlitePool::connect_with(options).await
        }
    };
    let producer = open("orders.db").await?;
    sqlx::query(
        "CREATE TABLE tandem_txn (txn_id TEXT NOT NULL PRIMARY KEY, state TEXT NOT NULL DEFAULT 'committed', \
         created_at INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER) * 1000))",
    )
    .execute(&producer)
    .await?;
    let consumer = open("cart.db").await?;
    sqlx::query(
        "CREATE TABLE tandem_inbox (consumer_group TEXT NOT NULL, topic TEXT NOT NULL, message_id TEXT NOT NULL, \
         processed_at INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (consumer_group, topic, message_id))",
    )
    .execute(&consumer)
    .await?;
    let sql = |db: &sqlx::SqlitePool, q: &'static str, id: &'static str| {
        let db = db.clone();
        async move { sqlx::query(q).bind(id).execute(&db).await.map(drop) }
    };
    let txn = |id: &'static str, commit: bool| {
        let mut c = c.clone();
        async move {
            c.prepare(pb::PrepareRequest {
                service: "orders".into(),
                txn_id: id.into(),
                topic: "orders".into(),
                message: Some(pb::Message {
                    value: bytes::Bytes::from_static(b"order"),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?;
            let end = pb::EndTransactionRequest {
                service: "orders".into(),
                txn_id: id.into(),
            };
            if commit {
                c.commit(end).await?;
            } else {
                c.rollback(end).await?;
            }
            TestResult::Ok(())
        }
    };
    // A clean run: a committed order (local row, consumed and recorded),
    // a rolled-back one (no row) and one the check-back fenced (marker).
    txn("o-1", true).await?;
    sql(
        &producer,
        "INSERT INTO tandem_txn (txn_id) VALUES ($1)",
        "o-1",
    )
    .await?;
    txn("o-2", false).await?;
    txn("o-3", false).await?;
    sql(
        &producer,
        "INSERT INTO tandem_txn (txn_id, state) VALUES ($1, 'rolled_back')",
        "o-3",
    )
    .await?;
    sql(
        &consumer,
        "INSERT INTO tandem_inbox (consumer_group, topic, message_id) VALUES ('cart', 'orders', $1)",
        "o-1",
    )
    .await?;
    let audit_args = |dir: &Path| -> Vec<String> {
        vec![
            "audit".into(),
            "--service".into(),
            "orders".into(),
            "--producer-db".into(),
            dir.join("orders.db").display().to_string(),
            "--consumer".into(),
            format!("cart={}", dir.join("cart.db").display()),
            "--stuck-after-ms".into(),
            "2000".into(),
        ]
    };
    let u = url.clone();
    let args = audit_args(dir.path());
    let (consumed, clean) = tokio::task::spawn_blocking(move || {
        let consumed = run(
            &u,
            &[
                "consume", "orders", "--group", "cart", "--from", "earliest", "--max", "1",
            ],
            "",
        )?;
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        TestResult::Ok((consumed, json(&u, &refs)?))
    })
    .await??;
    assert!(consumed.0, "{}", consumed.2);
    assert_eq!(clean["consistent"], true, "{clean}");
    // The wrong service name does not pass: its rows belong to "orders".
    let u = url.clone();
    let mut wrong = audit_args(dir.path());
    wrong[2] = "order".into();
    wrong.push("--json".into());
    let typo = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = wrong.iter().map(String::as_str).collect();
        run(&u, &refs, "")
    })
    .await??;
    assert!(!typo.0 && typo.1.contains("other-service"), "{}", typo.1);
    assert_eq!(clean["transactions"]["committed"], 1);
    assert_eq!(clean["transactions"]["rolled-back"], 2);
    assert_eq!(clean["consumers"][0]["pending"], 0);

    // Planted: a rolled-back order committed locally and recorded by the
    // cart; the cart's record of o-1 gone though it acknowledged it; a
    // local row the coordinator never heard of; an order left prepared.
    txn("o-4", false).await?;
    sql(
        &producer,
        "INSERT INTO tandem_txn (txn_id) VALUES ($1)",
        "o-4",
    )
    .await?;
    sql(
        &consumer,
        "INSERT INTO tandem_inbox (consumer_group, topic, message_id) VALUES ('cart', 'orders', $1)",
        "o-4",
    )
    .await?;
    sql(
        &consumer,
        "DELETE FROM tandem_inbox WHERE message_id = $1",
        "o-1",
    )
    .await?;
    sql(
        &producer,
        "INSERT INTO tandem_txn (txn_id) VALUES ($1)",
        "ghost",
    )
    .await?;
    c.prepare(pb::PrepareRequest {
        service: "orders".into(),
        txn_id: "o-5".into(),
        topic: "orders".into(),
        message: Some(pb::Message::default()),
        ..Default::default()
    })
    .await?;
    producer.close().await;
    consumer.close().await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let u = url.clone();
    let args = audit_args(dir.path());
    let (found, text) = tokio::task::spawn_blocking(move || {
        let mut with_json = args.clone();
        with_json.push("--json".into());
        let refs: Vec<&str> = with_json.iter().map(String::as_str).collect();
        let found = run(&u, &refs, "")?;
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        TestResult::Ok((found, run(&u, &refs, "")?))
    })
    .await??;
    assert!(!found.0, "an inconsistency exits non-zero");
    let report: Value = serde_json::from_str(&found.1)?;
    let mut kinds: Vec<(String, String)> = report["problems"]
        .as_array()
        .ok_or("problems")?
        .iter()
        .map(|p| {
            (
                p["kind"].as_str().unwrap_or_default().to_owned(),
                p["txn_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    kinds.sort();
    let want: Vec<(String, String)> = [
        ("acked-not-recorded", "o-1"),
        ("delivered-but-rolled-back", "o-4"),
        ("local-unknown", "ghost"),
        ("rolled-back-but-local", "o-4"),
        ("stuck", "o-5"),
    ]
    .iter()
    .map(|(k, i)| ((*k).to_owned(), (*i).to_owned()))
    .collect();
    assert_eq!(kinds, want, "{report}");
    assert!(
        !text.0 && text.1.contains("5 inconsistencies"),
        "{}",
        text.1
    );
    Ok(())
}

/// A sidecar says it listens (and its health says SERVING) only once its
/// app's database is reached: one whose database cannot be reached exits
/// with the reason, never having said so.
#[test]
fn a_sidecar_whose_database_is_unreachable_never_says_it_listens() -> TestResult {
    let mut child = Command::new(TANDEM)
        .args([
            "sidecar",
            "--listen",
            "127.0.0.1:0",
            "--coordinator",
            "http://127.0.0.1:9",
            "--service",
            "shop",
            "--db",
            "postgres://tandem@127.0.0.1:9/nowhere",
            "--set",
            "metrics_listen=off",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("the sidecar neither served nor gave up within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{stdout} {stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(stderr.contains("PostgreSQL"), "{stderr}");
    Ok(())
}

/// `tandem topic delete`: refused while a group has members on the topic,
/// while a transaction for it is open, and for Tandem's own topics; once
/// done the topic, its files and every group's offsets on it are gone, for
/// good (a restart does not bring them back), and the name starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_topic_is_gone_with_its_offsets_and_its_name_starts_afresh() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut coordinator = start_coordinator(dir.path())?;
    let url = coordinator.url();
    let u = url.clone();
    tokio::task::spawn_blocking(move || -> TestResult {
        run(&u, &["topic", "create", "doomed", "--partitions", "2"], "")?;
        let (ok, _, err) = run(&u, &["publish", "doomed"], "a\nb\n")?;
        assert!(ok, "{err}");
        run_bounded(
            &u,
            &[
                "consume", "doomed", "--group", "g", "--from", "earliest", "--max", "2",
            ],
        )?;
        Ok(())
    })
    .await??;
    let mut c = pb::coordinator_client::CoordinatorClient::connect(url.clone()).await?;
    let delete = |name: &'static str| {
        let u = url.clone();
        tokio::task::spawn_blocking(move || run(&u, &["topic", "delete", name, "--json"], ""))
    };

    // A member holds it: refused.
    let (tx, stream) = join(&mut c, "doomed", "live").await?;
    let (ok, _, err) = delete("doomed").await??;
    assert!(
        !ok && err.contains("FailedPrecondition") && err.contains("member"),
        "{err}"
    );
    drop(tx);
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = c
            .describe_topic(pb::DescribeTopicRequest {
                name: "doomed".into(),
            })
            .await?
            .into_inner();
        if d.groups.iter().all(|g| g.members == 0) {
            break;
        }
        if Instant::now() > deadline {
            return Err("the member did not leave".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A transaction for it is open: refused, until it ends.
    c.prepare(pb::PrepareRequest {
        service: "shop".into(),
        txn_id: "t-open".into(),
        topic: "doomed".into(),
        message: Some(pb::Message::default()),
        ..Default::default()
    })
    .await?;
    let (ok, _, err) = delete("doomed").await??;
    assert!(!ok && err.contains("t-open"), "{err}");
    c.rollback(pb::EndTransactionRequest {
        service: "shop".into(),
        txn_id: "t-open".into(),
    })
    .await?;
    let (ok, _, err) = delete("__sagas").await??;
    assert!(!ok && err.contains("InvalidArgument"), "{err}");

    assert!(dir.path().join("coordinator/topics/doomed/0").exists());
    let (ok, out, err) = delete("doomed").await??;
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out)?["deleted"], "doomed");
    let topics = c
        .list_topics(pb::ListTopicsRequest {})
        .await?
        .into_inner()
        .topics;
    assert!(topics.iter().all(|t| t.name != "doomed"), "{topics:?}");
    let e = c
        .describe_topic(pb::DescribeTopicRequest {
            name: "doomed".into(),
        })
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(e, Some(tonic::Code::NotFound));
    assert!(
        !dir.path().join("coordinator/topics/doomed").exists(),
        "its files are deleted"
    );

    // After a restart it is still gone; created again, it is new: empty,
    // and no group remembers an offset on it.
    coordinator.kill();
    let coordinator = start_coordinator(dir.path())?;
    let mut c = pb::coordinator_client::CoordinatorClient::connect(coordinator.url()).await?;
    let topics = c
        .list_topics(pb::ListTopicsRequest {})
        .await?
        .into_inner()
        .topics;
    assert!(topics.iter().all(|t| t.name != "doomed"), "{topics:?}");
    c.create_topic(pb::CreateTopicRequest {
        name: "doomed".into(),
        partitions: 2,
    })
    .await?;
    let d = c
        .describe_topic(pb::DescribeTopicRequest {
            name: "doomed".into(),
        })
        .await?
        .into_inner();
    assert!(d.partitions.iter().all(|p| p.high_water_mark == 0), "{d:?}");
    assert!(d.groups.is_empty(), "no offsets survive: {d:?}");
    Ok(())
}
