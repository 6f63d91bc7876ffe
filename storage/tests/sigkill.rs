//! Durability contract under a real crash: a writer process appending from
//! several concurrent appenders (fsync `always`) is killed with SIGKILL in
//! the middle of a burst; every record it printed as acknowledged is found,
//! byte for byte, at its offset after reopening; twice over, so recovery is
//! also tested on a log that was itself recovered and appended to.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_storage::{EmbeddedLog, Log, LogConfig, ReadBudget, TopicPartition};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// One acknowledgement: partition, offset, record id.
type Ack = (u32, u64, String);

/// Runs the writer until it has acknowledged `min_acks` records (or 30 s
/// pass), kills it with SIGKILL, and returns every acknowledgement it printed.
fn run_and_kill(dir: &std::path::Path, min_acks: usize) -> TestResult<Vec<Ack>> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem-log-writer"))
        .arg(dir)
        .arg("8")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lines = Vec::new();
    while lines.len() < min_acks && Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            lines.push(l);
        }
    }
    child.kill()?; // SIGKILL
    child.wait()?;
    reader.join().map_err(|_| "reader thread panicked")?;
    lines.extend(rx.try_iter());
    let mut acks = Vec::new();
    for l in lines {
        let mut parts = l.splitn(3, ' ');
        let (Some(p), Some(o), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("bad line {l:?}").into());
        };
        acks.push((p.parse()?, o.parse()?, id.to_owned()));
    }
    Ok(acks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_sigkill() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut acked: HashMap<(u32, u64), String> = HashMap::new();
    for round in 0..2 {
        let acks = run_and_kill(dir.path(), 2000)?;
        assert!(
            acks.len() >= 100,
            "round {round}: the writer acknowledged only {} records",
            acks.len()
        );
        for (p, o, id) in acks {
            assert!(
                acked.insert((p, o), id).is_none(),
                "offset {p}/{o} acknowledged twice"
            );
        }
        let log = EmbeddedLog::open(dir.path(), LogConfig::default()).await?;
        let mut found = 0;
        for p in 0..2u32 {
            let tp = TopicPartition::new("crash", p);
            let mut from = 0;
            loop {
                let batch = log.read(&tp, from, ReadBudget::default()).await?;
                let Some(last) = batch.last() else { break };
                from = last.offset + 1;
                for r in batch {
                    if let Some(id) = acked.get(&(p, r.offset)) {
                        assert_eq!(
                            r.record.id,
                            Bytes::from(id.clone()),
                            "record at {p}/{}",
                            r.offset
                        );
                        assert_eq!(r.record.value, Bytes::from(id.repeat(1 + id.len() % 7)));
                        found += 1;
                    }
                }
            }
        }
        assert_eq!(
            found,
            acked.len(),
            "round {round}: every acknowledged record is there"
        );
        log.close().await;
    }
    Ok(())
}
