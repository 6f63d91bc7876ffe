//! `tandem demo` as a new user runs it: a passing verdict normally (orders
//! through transactional messages, checkouts through sagas), and a failing
//! one (with a non-zero exit) when the dedup table is switched off, which
//! proves the verdict really checks.

use std::process::Command;

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

fn demo(extra: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let out = Command::new(TANDEM)
        .args(["demo", "--orders", "300", "--data-dir"])
        .arg(dir.path())
        .args(extra)
        .output()
        .expect("tandem demo runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_demo_passes_its_verdict_through_injected_faults() {
    let (ok, out) = demo(&[]);
    assert!(ok, "{out}");
    assert!(out.contains("Verdict: PASS"), "{out}");
    // every fault the report names really happened, and each is reported
    assert!(out.contains("cart service killed after commit 1x"), "{out}");
    assert!(out.contains("cart sidecar SIGKILLed 1x"), "{out}");
    assert!(out.contains("orders left to check-back 12x"), "{out}");
    // `tandem audit` agrees, over every order's transaction
    let audit = out
        .lines()
        .find(|l| l.contains("tandem audit"))
        .expect("an audit line");
    assert!(
        audit.contains("consistent (") && audit.contains("0 inconsistencies"),
        "{audit}"
    );
    // the scheduled faults: 6 in 50 orders roll back, 2 in 50 go through
    // check-back; on a loaded machine a local transaction slower than
    // check_after_ms is rolled back by check-back too, so these are floors
    let count = |label: &str| -> u32 {
        let line = out.lines().find(|l| l.contains(label)).expect(label);
        let n = line[line.find(label).expect(label) + label.len()..]
            .split_whitespace()
            .next()
            .expect("a count");
        n.trim_end_matches([',', 'x']).parse().expect("a number")
    };
    assert!(count("local transactions failed ") >= 18, "{out}");
    assert!(count("rolled back ") >= 24, "{out}");
    assert_eq!(count("committed ") + count("rolled back "), 300, "{out}");
    assert!(count("resolved by check-back ") >= 12, "{out}");
    // the sagas: one checkout in 20 fails locally; small accounts make
    // some payments fail for good, and those sagas are compensated
    let line = out
        .lines()
        .find(|l| l.contains("checkouts (sagas)"))
        .expect("a checkouts line");
    let number = |after: &str| -> u32 {
        let words: Vec<&str> = line.split_whitespace().collect();
        let i = words.iter().position(|w| *w == after).expect(after);
        words[i - 1]
            .trim_start_matches('(')
            .parse()
            .expect("a count")
    };
    assert!(line.contains("300:"), "{line}");
    assert!(number("never") >= 15, "{line}");
    assert!(number("confirmed,") > 0, "{line}");
    assert!(number("payments") > 0, "{line}");
    assert_eq!(number("cancelled"), number("payments"), "{line}");
}

#[test]
fn without_dedup_the_verdict_fails() {
    let (ok, out) = demo(&["--no-dedup"]);
    assert!(!ok, "{out}");
    assert!(out.contains("Verdict: FAIL"), "{out}");
    assert!(out.contains("applied to the cart 2 times"), "{out}");
}
