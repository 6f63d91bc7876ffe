//! Test helper for crash tests: opens an embedded log (fsync `always`) and
//! appends from several concurrent appenders until it is killed, printing
//! `PARTITION OFFSET ID` for every acknowledged record, in the order acks
//! arrive.
//!
//! Usage: `tandem-log-writer DIR [APPENDERS]`

use std::io::Write;

use bytes::Bytes;
use tandem_storage::{EmbeddedLog, Error, Log, LogConfig, Record, TopicPartition};

const PARTITIONS: u32 = 2;

/// The value written for a record id, so a reader can check content.
fn value_for(id: &str) -> Bytes {
    Bytes::from(id.repeat(1 + id.len() % 7))
}

async fn run(dir: String, appenders: usize) -> Result<(), Error> {
    let config = LogConfig {
        segment_bytes: 256 << 10,
        ..LogConfig::default()
    };
    let log = EmbeddedLog::open(dir, config).await?;
    for p in 0..PARTITIONS {
        let tp = TopicPartition::new("crash", p);
        match log.create_partition(&tp).await {
            Ok(()) | Err(Error::PartitionExists(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let run_id = std::process::id();
    let mut tasks = Vec::new();
    for w in 0..appenders {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let tp = TopicPartition::new("crash", w as u32 % PARTITIONS);
            for i in 0u64.. {
                let id = format!("{run_id}-{w}-{i}");
                let record = Record {
                    id: Bytes::from(id.clone()),
                    key: None,
                    value: value_for(&id),
                    headers: Vec::new(),
                    timestamp_ms: 0,
                };
                let ack = log.append(&tp, vec![record]).await?;
                let mut out = std::io::stdout().lock();
                writeln!(out, "{} {} {id}", tp.partition, ack.base_offset)
                    .and_then(|()| out.flush())
                    .map_err(|e| Error::Io {
                        op: "write",
                        path: "stdout".into(),
                        source: e,
                    })?;
            }
            Ok::<(), Error>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|_| Error::Closed)??;
    }
    Ok(())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next() else {
        eprintln!("usage: tandem-log-writer DIR [APPENDERS]");
        std::process::exit(2);
    };
    let appenders = args.next().and_then(|a| a.parse().ok()).unwrap_or(8);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tandem-log-writer: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(dir, appenders)) {
        eprintln!("tandem-log-writer: {e}");
        std::process::exit(1);
    }
}
