//! `tandem bench` as a user runs it: short runs of each scenario end with a
//! JSON report whose figures come from messages that went all the way
//! through (every scenario waits until each transaction it committed was
//! applied, and fails otherwise); bad arguments are refused, naming them.

use std::process::Command;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

fn bench(args: &[&str]) -> TestResult<serde_json::Value> {
    let out = Command::new(TANDEM)
        .arg("bench")
        .args(args)
        .args(["--seconds", "0.5", "--json"])
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
fn transactions_with_no_tables_and_on_sqlite_report_what_was_applied() -> TestResult {
    let report = bench(&["txn", "txn-sqlite"])?;
    check(&report, &["txn", "txn-sqlite"])
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

#[test]
fn bad_arguments_are_refused_naming_them() -> TestResult {
    for (args, named) in [
        (&["--seconds", "0"][..], "--seconds"),
        (&["--rounds", "0"][..], "--rounds"),
        (&["--paced=-5"][..], "--paced"),
        (&["--relay-batch", "0"][..], "--relay-batch"),
        (&["nosuch"][..], "nosuch"),
    ] {
        let out = Command::new(TANDEM).arg("bench").args(args).output()?;
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{args:?}: {err}");
    }
    Ok(())
}
