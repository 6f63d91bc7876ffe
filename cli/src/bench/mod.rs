//! `tandem bench`: transactional messages through Tandem beside the
//! hand-written PostgreSQL outbox, run alternately in one process on one
//! PostgreSQL server, so their ratio is taken on the same machine at the
//! same moment; and beside them the floor under each part (empty gRPC
//! calls, raw writes and syncs) and publish → consume.

mod plot;
mod report;

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tandem_e2e::bench::{
    Pacing, Point, append, outbox, pubsub, restart, saga, sidecar, txn, unary,
};

/// A scenario of `tandem bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum Scenario {
    /// Tandem's own part: Begin → Commit → delivered → deduplicated, no
    /// local transaction, no effect.
    Txn,
    /// Both services' tables on SQLite (FULL sync).
    TxnSqlite,
    /// Both services' tables on PostgreSQL, the coordinator on its
    /// embedded store.
    TxnPostgres,
    /// Both services' tables on PostgreSQL, and the coordinator on it too.
    TxnPostgresStore,
    /// The baseline: an outbox table and a SKIP LOCKED relay on PostgreSQL.
    Outbox,
    /// One empty unary gRPC call per "transaction" over loopback: the floor
    /// under each of a transaction's hops.
    Unary,
    /// Sagas of three branches on three services (each its sidecar and its
    /// SQLite database), started through a fourth service's sidecar: sagas
    /// started and done per second.
    Saga,
    /// The embedded log's appends (fsync always) against raw write +
    /// fdatasync in the same folder.
    Append,
    /// Publish → consume through a coordinator on its embedded store:
    /// messages received per second, publish latency paced.
    Pubsub,
    /// Publish → consume with the coordinator on PostgreSQL (not run by
    /// default).
    PubsubPostgresStore,
    /// One publish per call through a sidecar process, beside the same
    /// straight to the coordinator: the latency and CPU a sidecar adds.
    Sidecar,
    /// A coordinator restarting with `--open` open half messages: time to
    /// serve again, memory, and the check-backs that follow (not run by
    /// default: loading a million takes a minute or more).
    Restart,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Txn => "txn",
            Scenario::TxnSqlite => "txn-sqlite",
            Scenario::TxnPostgres => "txn-postgres",
            Scenario::TxnPostgresStore => "txn-postgres-store",
            Scenario::Outbox => "outbox",
            Scenario::Unary => "unary",
            Scenario::Saga => "saga",
            Scenario::Append => "append",
            Scenario::Pubsub => "pubsub",
            Scenario::PubsubPostgresStore => "pubsub-postgres-store",
            Scenario::Sidecar => "sidecar",
            Scenario::Restart => "restart",
        }
    }

    /// What its rates count.
    fn unit(self) -> &'static str {
        match self {
            Scenario::Unary | Scenario::Sidecar => "calls",
            Scenario::Saga => "sagas",
            Scenario::Append => "records",
            Scenario::Pubsub | Scenario::PubsubPostgresStore => "messages",
            _ => "transactions",
        }
    }

    fn needs_postgres(self) -> bool {
        matches!(
            self,
            Scenario::TxnPostgres
                | Scenario::TxnPostgresStore
                | Scenario::Outbox
                | Scenario::PubsubPostgresStore
        )
    }

    const ALL: [Scenario; 10] = [
        Scenario::Txn,
        Scenario::TxnSqlite,
        Scenario::TxnPostgres,
        Scenario::TxnPostgresStore,
        Scenario::Outbox,
        Scenario::Unary,
        Scenario::Saga,
        Scenario::Append,
        Scenario::Pubsub,
        Scenario::Sidecar,
    ];
}

/// Arguments of `tandem bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Scenarios to run, in this order in every round (default: all).
    #[arg(value_enum)]
    pub scenarios: Vec<Scenario>,
    /// Length of each phase (peak, then paced) of each scenario.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Rounds: every scenario runs once per round, alternating.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Producer workers of the Tandem scenarios (each one transaction at a
    /// time; on PostgreSQL they share 16 connections).
    #[arg(long, default_value_t = 64)]
    pub workers: usize,
    /// Messages per handler call of the Tandem scenarios' consumer (its
    /// subscription's `max_batch`): above 1 it applies each call's messages
    /// in one transaction, as the outbox's relay does its batches; 1: one
    /// HandleMessage call and one transaction per message.
    #[arg(long, default_value_t = 64)]
    pub batch: u32,
    /// Producer connections of the outbox baseline.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Relay workers of the outbox baseline.
    #[arg(long, default_value_t = 4)]
    pub relays: usize,
    /// Outbox rows a relay moves per round trip.
    #[arg(long, default_value_t = 256)]
    pub relay_batch: i64,
    /// Rate of the main paced phase, in the scenario's own unit
    /// (transactions, sagas, calls, or messages for pubsub) per second
    /// (default: half of the scenario's own peak in that round).
    #[arg(long)]
    pub paced: Option<f64>,
    /// Shards of the coordinator's PostgreSQL store in `txn-postgres-store`
    /// (default: the coordinator's default).
    #[arg(long)]
    pub shards: Option<u32>,
    /// The coordinator's `group_commit_wait_us` in the transactional
    /// scenarios (default: the coordinator's default).
    #[arg(long, value_name = "US")]
    pub group_commit_wait_us: Option<u64>,
    /// A PostgreSQL server to run on (any of its databases; fresh databases
    /// are created and dropped). Default: a server of the bench's own, from
    /// the installed PostgreSQL binaries, with `fsync = on`.
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,
    /// Open half messages the `restart` scenario restarts with.
    #[arg(long, default_value_t = 1_000_000)]
    pub open: u64,
    /// The `restart` scenario's check_after_ms: transactions older than
    /// this are due for a check-back when the coordinator restarts.
    #[arg(long, default_value_t = 10_000)]
    pub check_after_ms: u64,
    /// Bytes of each message's value in the publish → consume scenarios.
    #[arg(long, default_value_t = 100)]
    pub message_bytes: usize,
    /// The `worker_threads` setting of the sidecar scenario's sidecar (0:
    /// one per CPU).
    #[arg(long, default_value_t = 1)]
    pub sidecar_threads: u32,
    /// Also run paced phases at 10, 25, 75 and 90 % of each scenario's peak
    /// and write a throughput/latency chart per scenario into this folder
    /// (`<scenario>.png`).
    #[arg(long, value_name = "DIR")]
    pub plot: Option<std::path::PathBuf>,
    /// Where the scenarios keep their data (a fresh folder in it, removed
    /// at the end): put it on the disk to measure; on tmpfs every
    /// fdatasync is free. Default: the temporary folder ($TMPDIR or /tmp).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<std::path::PathBuf>,
    /// Print the results as one JSON document instead of a table.
    #[arg(long, conflicts_with = "markdown")]
    pub json: bool,
    /// Print the table as Markdown (as BENCHMARKS.md holds it).
    #[arg(long)]
    pub markdown: bool,
}

struct Row {
    scenario: Scenario,
    /// The case within the scenario (`append` has several).
    case: Option<&'static str>,
    round: u32,
    committed_per_s: f64,
    applied_per_s: f64,
    /// This process's CPU per applied transaction, µs (not PostgreSQL's).
    cpu_us: Option<f64>,
    /// The coordinator's (append: the log's) fdatasync per applied unit.
    fsyncs: Option<f64>,
    stages_ms: Option<[f64; 3]>,
    /// Latency at each paced rate, the main one first (append: at its own
    /// closed-loop rate; its raw baselines: none).
    curve: Vec<Point>,
    /// The sidecar process's CPU per call at peak, µs (the sidecar
    /// scenario's row through it).
    sidecar_cpu_peak_us: Option<f64>,
}

/// Runs `tandem bench`, writing the report to `out`.
pub async fn bench(args: BenchArgs, out: &mut impl Write) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.seconds > 0.0 && args.seconds.is_finite(),
        "--seconds must be a positive number of seconds"
    );
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!(
        (1..=255).contains(&args.workers),
        "--workers must be between 1 and 255"
    );
    anyhow::ensure!(
        args.clients > 0 && args.relays > 0,
        "--clients and --relays must be at least 1"
    );
    anyhow::ensure!(args.relay_batch > 0, "--relay-batch must be at least 1");
    anyhow::ensure!(
        (1..=100_000_000).contains(&args.open),
        "--open must be between 1 and 100000000"
    );
    anyhow::ensure!(
        (100..=3_600_000).contains(&args.check_after_ms),
        "--check-after-ms must be between 100 and 3600000"
    );
    anyhow::ensure!(
        (1..=256).contains(&args.batch),
        "--batch must be between 1 and 256 (the consumer's max_in_flight)"
    );
    anyhow::ensure!(
        (1..=65_536).contains(&args.message_bytes),
        "--message-bytes must be between 1 and 65536"
    );
    anyhow::ensure!(
        args.seconds <= 3600.0,
        "--seconds must be at most 3600 (one hour per phase)"
    );
    if let Some(p) = args.paced {
        anyhow::ensure!(
            p > 0.0 && p <= 10_000_000.0,
            "--paced must be a rate above 0 and at most 10000000 per second"
        );
    }
    anyhow::ensure!(
        args.sidecar_threads <= 256,
        "--sidecar-threads must be between 0 (one per CPU) and 256"
    );
    if let Some(us) = args.group_commit_wait_us {
        anyhow::ensure!(
            us <= 100_000,
            "--group-commit-wait-us must be between 0 and 100000"
        );
    }
    if let Some(n) = args.shards {
        let max = tandem_coordinator::shards::MAX_SHARDS;
        anyhow::ensure!(
            (1..=max).contains(&n),
            "--shards must be between 1 and {max}"
        );
    }
    if let Some(dir) = &args.plot {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--plot: cannot create {}", dir.display()))?;
    }
    // Listening from the start: a Ctrl-C while the bench's own PostgreSQL
    // starts must stop it too, not kill the bench and leave the server.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the signal handlers")?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the signal handlers")?;
    let mut scenarios = if args.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenarios.clone()
    };
    // each once per round, in the order first named
    let mut named = std::collections::HashSet::new();
    scenarios.retain(|s| named.insert(*s));
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("tandem-bench-")
        .tempdir_in(&base)
        .with_context(|| format!("--dir: cannot make a folder in {}", base.display()))?;
    let mut own = None;
    let server = match (&args.postgres, scenarios.iter().any(|s| s.needs_postgres())) {
        (Some(url), _) => Some(url.clone()),
        (None, true) => {
            let pg = tandem_e2e::postgres::Postgres::start_durable(&dir.path().join("pg"))
                .context(
                    "starting a PostgreSQL server for the bench (or give one with --postgres)",
                )?;
            let url = pg.url("postgres");
            own = Some(pg);
            Some(url)
        }
        (None, false) => None,
    };
    let postgres_version = match &server {
        Some(url) => Some(server_version(url).await?),
        None => None,
    };
    // Stopped by a signal: the own server and the folder go as `own` and
    // `dir` are dropped, and what was measured is printed.
    let mut rows = Vec::new();
    let mut restarts = Vec::new();
    let outcome = tokio::select! {
        r = run_all(&args, &scenarios, server.as_deref(), dir.path(), &mut rows, &mut restarts) => r,
        _ = term.recv() => Err(anyhow::anyhow!("interrupted")),
        _ = int.recv() => Err(anyhow::anyhow!("interrupted")),
    };
    drop(own);
    drop(dir);
    let postgres = match (&args.postgres, &postgres_version) {
        (_, None) => None,
        (Some(_), Some(v)) => Some(format!("given, version {v}")),
        (None, Some(v)) => Some(format!("own, fsync on, version {v}")),
    };
    if args.json {
        report::json(&args, &rows, &restarts, postgres, outcome.is_ok(), out)?;
    } else {
        report::human(&args, &rows, &restarts, out)?;
    }
    if let Some(dir) = &args.plot {
        report::plots(&rows, dir)?;
    }
    outcome
}

/// The PostgreSQL server's version, which also proves it can be reached.
async fn server_version(url: &str) -> anyhow::Result<String> {
    let host = url.rsplit_once('@').map_or(url, |(_, h)| h);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("--postgres: cannot reach PostgreSQL at {host}"))?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await
        .with_context(|| format!("--postgres: asking {host} its version"))?;
    pool.close().await;
    Ok(version)
}

/// Runs every round, adding each scenario's row as it ends.
async fn run_all(
    args: &BenchArgs,
    scenarios: &[Scenario],
    server: Option<&str>,
    dir: &std::path::Path,
    rows: &mut Vec<Row>,
    restarts: &mut Vec<(u32, restart::Report)>,
) -> anyhow::Result<()> {
    let seconds = Duration::from_secs_f64(args.seconds);
    for round in 1..=args.rounds {
        for (i, &scenario) in scenarios.iter().enumerate() {
            let label = format!(
                "round {round}/{}, {} ({}/{})",
                args.rounds,
                scenario.name(),
                i + 1,
                scenarios.len()
            );
            let server = || server.map(str::to_owned).context("no PostgreSQL server");
            let context = || format!("scenario {}", scenario.name());
            if scenario == Scenario::Restart {
                let r = restart::run(
                    &restart::Options {
                        open: args.open,
                        check_after: Duration::from_millis(args.check_after_ms),
                        dir: dir.join(format!("{round}-restart")),
                    },
                    &label,
                )
                .await
                .with_context(context)?;
                restarts.push((round, r));
                continue;
            }
            let pacing = Pacing {
                rate: args.paced,
                curve: args.plot.is_some(),
            };
            let row = |committed_per_s, applied_per_s, cpu_us, fsyncs, curve| Row {
                scenario,
                case: None,
                round,
                committed_per_s,
                applied_per_s,
                cpu_us,
                fsyncs,
                stages_ms: None,
                curve,
                sidecar_cpu_peak_us: None,
            };
            match scenario {
                Scenario::Restart => unreachable!("handled above"),
                Scenario::Saga => {
                    let r = saga::run(
                        &saga::Options {
                            seconds,
                            workers: args.workers,
                            pacing,
                            dir: dir.join(format!("{round}-saga")),
                        },
                        &label,
                    )
                    .await
                    .with_context(context)?;
                    rows.push(row(
                        r.started_per_s,
                        r.done_per_s,
                        Some(r.cpu_us),
                        None,
                        r.curve,
                    ));
                }
                Scenario::Unary => {
                    let r = unary::run(
                        &unary::Options {
                            seconds,
                            workers: args.workers,
                            pacing,
                        },
                        &label,
                    )
                    .await
                    .with_context(context)?;
                    rows.push(row(
                        r.calls_per_s,
                        r.window_per_s,
                        Some(r.cpu_us),
                        None,
                        r.curve,
                    ));
                }
                Scenario::Sidecar => {
                    let r = sidecar::run(
                        &sidecar::Options {
                            seconds,
                            workers: args.workers,
                            pacing,
                            dir: dir.join(format!("{round}-sidecar")),
                            exe: std::env::current_exe()
                                .context("finding the tandem binary to start a sidecar")?,
                            worker_threads: args.sidecar_threads,
                        },
                        &label,
                    )
                    .await
                    .with_context(context)?;
                    rows.push(Row {
                        case: Some(sidecar::VIA),
                        sidecar_cpu_peak_us: Some(r.sidecar_cpu_us_at_peak),
                        ..row(
                            r.via_peak_per_s,
                            r.via_peak_per_s,
                            r.sidecar_cpu_us.first().copied(),
                            None,
                            r.via,
                        )
                    });
                    rows.push(Row {
                        case: Some(sidecar::DIRECT),
                        ..row(
                            r.direct_peak_per_s,
                            r.direct_peak_per_s,
                            None,
                            None,
                            r.direct,
                        )
                    });
                }
                Scenario::Outbox => {
                    let r = outbox::run(
                        &outbox::Options {
                            seconds,
                            clients: args.clients,
                            relays: args.relays,
                            batch: args.relay_batch,
                            pacing,
                            server: server()?,
                        },
                        &label,
                    )
                    .await
                    .with_context(context)?;
                    rows.push(row(r.committed_per_s, r.applied_per_s, None, None, r.curve));
                }
                Scenario::Append => {
                    let r = append::run(
                        &append::Options {
                            seconds,
                            dir: dir.join(format!("{round}-append")),
                            group_commit_wait: args.group_commit_wait_us.map(Duration::from_micros),
                        },
                        &label,
                    )
                    .await
                    .with_context(context)?;
                    for c in r.cases {
                        let curve = c.latency.map(|latency| Point {
                            rate: c.records_per_s,
                            sent: c.records,
                            latency,
                            late: None,
                        });
                        rows.push(Row {
                            case: Some(c.name),
                            ..row(
                                c.records_per_s,
                                c.records_per_s,
                                Some(c.cpu_us),
                                Some(c.fsyncs_per_record),
                                curve.into_iter().collect(),
                            )
                        });
                    }
                }
                Scenario::Pubsub | Scenario::PubsubPostgresStore => {
                    let store_on = if scenario == Scenario::PubsubPostgresStore {
                        Some(server()?)
                    } else {
                        None
                    };
                    let r = pubsub::run(
                        &pubsub::Options {
                            seconds,
                            message_bytes: args.message_bytes,
                            pacing,
                            dir: dir.join(format!("{round}-{}", scenario.name())),
                            store_on,
                        },
                        &label,
                    )
                    .await
                    .with_context(context)?;
                    rows.push(row(
                        r.published_per_s,
                        r.consumed_per_s,
                        Some(r.cpu_us),
                        r.fsyncs_per_message,
                        r.curve,
                    ));
                }
                Scenario::Txn
                | Scenario::TxnSqlite
                | Scenario::TxnPostgres
                | Scenario::TxnPostgresStore => {
                    let tables = match scenario {
                        Scenario::Txn => txn::Tables::Skipped,
                        Scenario::TxnSqlite => txn::Tables::Sqlite,
                        _ => txn::Tables::Postgres(server()?),
                    };
                    let coordinator_on = if scenario == Scenario::TxnPostgresStore {
                        Some(server()?)
                    } else {
                        None
                    };
                    let r = txn::run(
                        &txn::Options {
                            seconds,
                            workers: args.workers,
                            pacing,
                            batch: args.batch,
                            tables,
                            coordinator_on,
                            shards: args.shards,
                            group_commit_wait: args.group_commit_wait_us.map(Duration::from_micros),
                            dir: dir.join(format!("{round}-{}", scenario.name())),
                        },
                        &label,
                    )
                    .await
                    .with_context(context)?;
                    rows.push(Row {
                        stages_ms: Some(r.stages_ms),
                        ..row(
                            r.committed_per_s,
                            r.applied_per_s,
                            Some(r.cpu_us),
                            r.fsyncs_per_txn,
                            r.curve,
                        )
                    });
                }
            }
        }
    }
    Ok(())
}
