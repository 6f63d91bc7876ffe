//! `tandem bench` as a user runs it: short runs of each scenario end with a
//! JSON report whose figures come from messages that went all the way
//! through (every scenario waits until each transaction it committed was
//! applied, and fails otherwise); bad arguments are refused, naming them.

use std::process::Command;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

fn bench(args: &[&str]) -> TestResult<serde_json::Value> {
    bench_for(args, "0.5")
}

fn bench_for(args: &[&str], seconds: &str) -> TestResult<serde_json::Value> {
    let out = Command::new(TANDEM)
        .arg("bench")
        .args(args)
        .args(["--seconds", seconds, "--json"])
        .output()?;
    assert!(
        out.status.success(),
        "tandem bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn check(report: &serde_json::Value, scenarios: &[&str]) -> TestResult {
    let results = report["results"].as_array().ok_or("results")?;
    let names: Vec<&str> = results
        .iter()
        .filter_map(|r| r["scenario"].as_str())
        .collect();
    assert_eq!(names, scenarios);
    for r in results {
        assert!(r["applied_per_s"].as_f64().ok_or("applied")? > 0.0, "{r}");
        assert!(
            r["committed_per_s"].as_f64().ok_or("committed")? > 0.0,
            "{r}"
        );
        assert!(r["samples"].as_u64().ok_or("samples")? > 0, "{r}");
        assert!(r["p99_ms"].as_f64().ok_or("p99")? >= r["p50_ms"].as_f64().ok_or("p50")?);
    }
    Ok(())
}

#[test]
fn transactions_with_no_tables_and_on_sqlite_and_sagas_report_what_was_applied() -> TestResult {
    let report = bench(&["txn", "txn-sqlite", "unary", "saga", "--batch", "1"])?;
    check(&report, &["txn", "txn-sqlite", "unary", "saga"])?;
    assert_eq!(report["batch"], 1);
    // CPU per transaction is measured (in 10 ms ticks: a short run may
    // count none, never a negative or missing figure)
    for r in report["results"].as_array().ok_or("results")? {
        assert!(r["cpu_us_per_txn"].as_f64().ok_or("cpu")? >= 0.0, "{r}");
    }
    // the coordinator's syncs are counted on its embedded store
    for r in &report["results"].as_array().ok_or("results")?[..2] {
        assert!(r["fsyncs_per_op"].as_f64().ok_or("fsyncs")? > 0.0, "{r}");
    }
    Ok(())
}

/// The storage and publish → consume scenarios, with a chart per
/// scenario: the log's cases beside raw writes measured in the same run,
/// and the paced points of the curve.
#[test]
fn appends_beside_raw_syncs_and_publish_consume_with_their_charts() -> TestResult {
    let dir = tempfile::tempdir()?;
    let plots = dir.path().join("plots");
    let plot_arg = plots.display().to_string();
    let report = bench_for(&["append", "pubsub", "sidecar", "--plot", &plot_arg], "0.3")?;
    let results = report["results"].as_array().ok_or("results")?;
    let cases: Vec<&str> = results
        .iter()
        .filter(|r| r["scenario"] == "append")
        .filter_map(|r| r["case"].as_str())
        .collect();
    assert_eq!(
        cases,
        [
            "raw 1 KiB write+fdatasync",
            "raw 1 MiB write+fdatasync, in KiB",
            "log 1 appender, waits on each, 1 KiB",
            "log 16 appenders x 64, 1 KiB",
            "log 16 partitions x 4, 100 B",
        ]
    );
    for r in results.iter().filter(|r| r["scenario"] != "sidecar") {
        assert!(r["applied_per_s"].as_f64().ok_or("applied")? > 0.0, "{r}");
        let fsyncs = r["fsyncs_per_op"].as_f64().ok_or("fsyncs")?;
        let raw = r["case"].as_str().is_some_and(|c| c.starts_with("raw"));
        if raw {
            // no latency for the raw baselines
            assert!(r["p50_ms"].is_null(), "{r}");
        } else {
            assert!(r["samples"].as_u64().ok_or("samples")? > 0, "{r}");
            assert!(r["p99_ms"].as_f64().ok_or("p99")? >= r["p50_ms"].as_f64().ok_or("p50")?);
        }
        if r["case"] == "raw 1 KiB write+fdatasync"
            || r["case"] == "log 1 appender, waits on each, 1 KiB"
        {
            // one sync per record: nothing to group
            assert!((fsyncs - 1.0).abs() < 1e-9, "{r}");
        } else {
            assert!(fsyncs > 0.0 && fsyncs < 1.0, "{r}");
        }
    }
    let pubsub = results
        .iter()
        .find(|r| r["scenario"] == "pubsub")
        .ok_or("pubsub")?;
    // the main paced phase and the four of the curve, each with samples
    let curve = pubsub["curve"].as_array().ok_or("curve")?;
    assert_eq!(curve.len(), 5, "{pubsub}");
    for p in curve {
        assert!(p["samples"].as_u64().ok_or("samples")? > 0, "{p}");
    }
    // the sidecar: both ways measured at the same rates, its process's CPU
    // counted
    let ways: Vec<&str> = results
        .iter()
        .filter(|r| r["scenario"] == "sidecar")
        .filter_map(|r| r["case"].as_str())
        .collect();
    assert_eq!(ways, ["via the sidecar", "direct to the coordinator"]);
    let rates = |case: &str| -> Vec<f64> {
        results
            .iter()
            .find(|r| r["case"] == case)
            .and_then(|r| r["curve"].as_array())
            .map(|c| c.iter().filter_map(|p| p["rate_per_s"].as_f64()).collect())
            .unwrap_or_default()
    };
    assert_eq!(rates("via the sidecar").len(), 5);
    let overhead = &report["sidecar_overhead"][0];
    assert_eq!(overhead["worker_threads"], 1, "{report}");
    assert!(
        overhead["sidecar_cpu_us_per_call"].as_f64().ok_or("cpu")? > 0.0,
        "{overhead}"
    );
    for name in ["append", "pubsub", "sidecar"] {
        let png = std::fs::read(plots.join(format!("{name}.png")))?;
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{name}.png");
        assert_eq!(&png[12..16], b"IHDR", "{name}.png");
    }
    assert_eq!(std::fs::read_dir(&plots)?.count(), 3);
    Ok(())
}

#[test]
fn on_postgresql_tandem_and_the_outbox_run_side_by_side() -> TestResult {
    let Ok(url) = std::env::var("TANDEM_TEST_POSTGRES") else {
        assert!(
            std::env::var_os("TANDEM_REQUIRE_POSTGRES").is_none(),
            "TANDEM_TEST_POSTGRES is not set but PostgreSQL tests are required"
        );
        eprintln!("skipped: no TANDEM_TEST_POSTGRES (scripts/test.sh provides one)");
        return Ok(());
    };
    let report = bench(&[
        "txn-postgres",
        "txn-postgres-store",
        "outbox",
        "--postgres",
        &url,
    ])?;
    check(&report, &["txn-postgres", "txn-postgres-store", "outbox"])?;
    let ratios = report["over_outbox"].as_array().ok_or("over_outbox")?;
    assert_eq!(ratios.len(), 2, "{report}");
    for r in ratios {
        assert!(r["applied_ratio"].as_f64().ok_or("ratio")? > 0.0);
    }
    Ok(())
}

/// `--markdown`: one table row per scenario, under its header, scenarios
/// named twice run once per round.
#[test]
fn the_markdown_table_has_a_row_per_scenario_and_round() -> TestResult {
    let out = Command::new(TANDEM)
        .args([
            "bench",
            "unary",
            "unary",
            "--rounds",
            "2",
            "--seconds",
            "0.3",
        ])
        .arg("--markdown")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("| ")).collect();
    assert!(rows[0].starts_with("| scenario | round |"), "{text}");
    assert_eq!(rows.len(), 3, "{text}");
    assert!(rows[1].starts_with("| unary | 1 |"), "{text}");
    assert!(rows[2].starts_with("| unary | 2 |"), "{text}");
    Ok(())
}

#[test]
fn bad_arguments_are_refused_naming_them() -> TestResult {
    for (args, named) in [
        (&["--seconds", "0"][..], "--seconds"),
        (&["--rounds", "0"][..], "--rounds"),
        (&["--paced=-5"][..], "--paced"),
        (&["--relay-batch", "0"][..], "--relay-batch"),
        (&["--batch", "0"][..], "--batch"),
        (&["--batch", "257"][..], "--batch"),
        (&["--shards", "0"][..], "--shards"),
        (&["--shards", "257"][..], "--shards"),
        (&["--workers", "256"][..], "--workers"),
        (&["--message-bytes", "0"][..], "--message-bytes"),
        (&["unary", "--plot", "/proc/no/such"][..], "--plot"),
        (&["--json", "--markdown"][..], "--markdown"),
        (&["--paced", "1e10"][..], "--paced"),
        (&["--seconds", "7200"][..], "--seconds"),
        (&["--sidecar-threads", "300"][..], "--sidecar-threads"),
        (&["unary", "--dir", "/proc/no/such"][..], "--dir"),
        (&["nosuch"][..], "nosuch"),
        (
            &["outbox", "--postgres", "postgres://x@127.0.0.1:1/postgres"][..],
            "cannot reach PostgreSQL at 127.0.0.1:1",
        ),
    ] {
        let out = Command::new(TANDEM).arg("bench").args(args).output()?;
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{args:?}: {err}");
    }
    Ok(())
}

/// SIGINT in the middle of a run: the bench's own PostgreSQL server is
/// stopped and its folder removed, and the process ends with an error.
#[test]
fn an_interrupted_run_leaves_no_server_or_folder_behind() -> TestResult {
    if std::env::var_os("TANDEM_REQUIRE_POSTGRES").is_none()
        && !std::path::Path::new("/usr/lib/postgresql").exists()
    {
        eprintln!("skipped: no PostgreSQL binaries (scripts/test.sh installs them)");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    // The postgres account must reach the server's folder in it.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let child = Command::new(TANDEM)
        .args(["bench", "outbox", "--seconds", "20"])
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let marker = tmp.path().display().to_string();
    let running = |marker: &str| -> usize {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
            })
            .count()
    };
    // Wait until its server runs, at most 60 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while running(&marker) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the bench's server never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    assert!(sent.success());
    let out = child.wait_with_output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(
        running(&marker),
        0,
        "a process of the bench's server is left"
    );
    assert_eq!(
        std::fs::read_dir(tmp.path())?.count(),
        0,
        "its folder is left"
    );
    Ok(())
}
