//! The real binaries as separate processes: a coordinator killed with
//! SIGKILL while `tandem publish` sends 100 000 lines loses none of the lines
//! `tandem publish` printed as acknowledged (after a restart `tandem consume`
//! returns every one of them, each partition in offset order); SIGTERM
//! ends sessions, commits what they acknowledged and exits cleanly; and
//! `tandem saga list|show` shows a compensated saga, and why.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

/// A child process killed (SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `tandem coordinator` on an ephemeral port; returns it and its URL.
fn coordinator(dir: &Path) -> TestResult<(Proc, String)> {
    let mut child = Command::new(TANDEM)
        .args(["coordinator", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("stdout")?;
    let proc = Proc(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(30))?;
    let addr = line.rsplit(' ').next().ok_or("address")?;
    Ok((proc, format!("http://{addr}")))
}

fn tandem(url: &str, args: &[&str]) -> TestResult<String> {
    let out = Command::new(TANDEM)
        .arg("--coordinator")
        .arg(url)
        .args(args)
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "tandem {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn acknowledged_lines_survive_a_coordinator_sigkill() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (mut coord, url) = coordinator(dir.path())?;
    tandem(&url, &["topic", "create", "lines", "--partitions", "4"])?;

    let mut publisher = Proc(
        Command::new(TANDEM)
            .args(["--coordinator", &url, "publish", "lines", "--batch", "500"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let mut stdin = publisher.0.stdin.take().ok_or("stdin")?;
    let stdout = publisher.0.stdout.take().ok_or("stdout")?;
    let (tx, acks) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The first half of the input goes in; once 20 000 lines are
    // acknowledged the coordinator is killed, with the rest in flight.
    let mut input = String::new();
    for i in 0..50_000 {
        input.push_str(&format!("line-{i}\n"));
    }
    stdin.write_all(input.as_bytes())?;
    stdin.flush()?;
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while printed.len() < 20_000 {
        assert!(
            Instant::now() < deadline,
            "only {} acknowledgements",
            printed.len()
        );
        if let Ok(l) = acks.recv_timeout(Duration::from_millis(100)) {
            printed.push(l);
        }
    }
    coord.0.kill()?; // SIGKILL
    coord.0.wait()?;
    let mut rest = String::new();
    for i in 50_000..100_000 {
        rest.push_str(&format!("line-{i}\n"));
    }
    let _ = stdin.write_all(rest.as_bytes()); // the publisher may already have stopped reading
    drop(stdin);
    let status = publisher.0.wait()?;
    reader.join().map_err(|_| "reader panicked")?;
    printed.extend(acks.try_iter());
    assert!(
        !status.success(),
        "publish must fail once the coordinator is gone"
    );
    assert!(
        printed.len() < 100_000,
        "the kill came too late to test anything"
    );
    // line i of the output acknowledges line i of the input
    let mut acknowledged: HashMap<(u32, u64), String> = HashMap::new();
    for (i, l) in printed.iter().enumerate() {
        let (p, o) = l.split_once(' ').ok_or("PARTITION OFFSET")?;
        acknowledged.insert((p.parse()?, o.parse()?), format!("line-{i}"));
    }
    assert_eq!(
        acknowledged.len(),
        printed.len(),
        "no position acknowledged twice"
    );

    let (_coord, url) = coordinator(dir.path())?;
    let describe = tandem(&url, &["topic", "describe", "lines"])?;
    let stored: u64 = describe
        .lines()
        .skip(2)
        .take(4)
        .map(|l| {
            l.split_whitespace()
                .nth(2)
                .and_then(|h| h.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    assert!(
        stored >= printed.len() as u64,
        "{stored} stored < {} acknowledged\n{describe}",
        printed.len()
    );
    let consumed = tandem(
        &url,
        &[
            "consume",
            "lines",
            "--group",
            "check",
            "--from",
            "earliest",
            "--max",
            &stored.to_string(),
            "--json",
        ],
    )?;
    let mut next_offset: HashMap<u32, u64> = HashMap::new();
    let mut found = 0;
    for line in consumed.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let p = v["partition"].as_u64().ok_or("partition")? as u32;
        let o = v["offset"].as_u64().ok_or("offset")?;
        let expected = next_offset.entry(p).or_insert(0);
        assert_eq!(
            o, *expected,
            "partition {p} in offset order, nothing skipped"
        );
        *expected += 1;
        if let Some(text) = acknowledged.get(&(p, o)) {
            assert_eq!(v["value"].as_str(), Some(text.as_str()), "at {p}/{o}");
            found += 1;
        }
    }
    assert_eq!(
        found,
        acknowledged.len(),
        "every acknowledged line is there"
    );
    eprintln!(
        "{} of 100000 lines acknowledged before the kill; {stored} stored after restart, all acknowledged ones found",
        acknowledged.len()
    );
    Ok(())
}

#[test]
fn sigterm_ends_sessions_commits_and_exits_cleanly() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (mut coord, url) = coordinator(dir.path())?;
    tandem(&url, &["topic", "create", "t", "--partitions", "2"])?;
    let mut publisher = Command::new(TANDEM)
        .args(["--coordinator", &url, "publish", "t"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    publisher
        .stdin
        .take()
        .ok_or("stdin")?
        .write_all(b"a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n")?;
    assert!(publisher.wait()?.success());
    // a consumer that wants more than there is keeps its session open
    let consumer = Proc(
        Command::new(TANDEM)
            .args([
                "--coordinator",
                &url,
                "consume",
                "t",
                "--group",
                "g",
                "--from",
                "earliest",
                "--max",
                "100",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let mut consumer = consumer;
    let out = consumer.0.stdout.take().ok_or("stdout")?;
    let lines: Vec<String> = BufReader::new(out)
        .lines()
        .take(10)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 10);
    // The consumer prints a batch before it acknowledges it: wait (bounded)
    // until the coordinator has the acknowledgements, so the test asks
    // whether acknowledged offsets survive SIGTERM, not whether an ack in
    // flight wins a race with the signal.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let describe = tandem(&url, &["topic", "describe", "t"])?;
        if describe
            .lines()
            .any(|l| l.starts_with("group g (1 members)") && l.ends_with("lag 0"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledgements never reached the coordinator: {describe}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = coord.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()?
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = coord.0.try_wait()? {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "coordinator did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let consumed = consumer.0.wait()?;
    assert!(
        !consumed.success(),
        "the consumer is told the coordinator is going away"
    );

    let (_coord, url) = coordinator(dir.path())?;
    let describe = tandem(&url, &["topic", "describe", "t"])?;
    assert!(
        describe.contains("group g (0 members): lag 0"),
        "{describe}"
    );
    Ok(())
}

#[test]
fn the_saga_commands_show_a_compensated_saga_and_why() -> TestResult {
    use tandem_proto::coordinator as pb;
    let dir = tempfile::tempdir()?;
    let (_c, url) = coordinator(dir.path())?;
    // No sidecar of service "gone" ever connects: its action never reaches
    // it, the saga gives up and compensates, and that branch's
    // compensation is a null one (recorded, not called).
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut c = pb::coordinator_client::CoordinatorClient::connect(url.clone()).await?;
        let branch = |name: &str, service: &str| pb::SagaBranch {
            name: name.into(),
            service: service.into(),
            action: "do".into(),
            compensation: "undo".into(),
            max_attempts: 1,
            timeout_ms: 2000,
            ..Default::default()
        };
        c.start_saga(pb::StartSagaRequest {
            saga_id: "order-7".into(),
            service: "orders".into(),
            definition: Some(pb::SagaDefinition {
                branches: vec![branch("reserve", "gone"), branch("charge", "payments")],
                concurrent: false,
                timeout_ms: 0,
            }),
        })
        .await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let list = loop {
        let list = tandem(&url, &["saga", "list", "--status", "compensated"])?;
        if list.contains("order-7") || Instant::now() > deadline {
            break list;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(list.contains("order-7"), "{list}");
    assert!(
        list.contains("branch reserve gave up after 1 attempts"),
        "{list}"
    );
    assert!(
        !tandem(&url, &["saga", "list", "--status", "succeeded"])?.contains("order-7"),
        "filtered by status"
    );
    let show = tandem(&url, &["saga", "show", "order-7"])?;
    assert!(
        show.starts_with("saga order-7 of orders: compensated"),
        "{show}"
    );
    assert!(show.contains("failed (1 calls, 1 failed)"), "{show}");
    assert!(
        show.contains(r#"action: no sidecar of service "gone" took the call"#),
        "{show}"
    );
    assert!(
        show.contains("compensation: action never reached its service"),
        "{show}"
    );
    let charge = show
        .lines()
        .find(|l| l.contains("charge"))
        .ok_or("charge line")?;
    assert!(charge.contains("pending"), "{charge}");
    let err = tandem(&url, &["saga", "show", "nope"]).expect_err("unknown saga");
    assert!(err.to_string().contains("does not exist"), "{err}");
    let err = tandem(&url, &["saga", "list", "--status", "stuck"]).expect_err("bad status");
    assert!(err.to_string().contains("--status"), "{err}");
    Ok(())
}
