//! `tandem bench`: transactional messages through Tandem beside the
//! hand-written PostgreSQL outbox, run alternately in one process on one
//! PostgreSQL server, so their ratio is taken on the same machine at the
//! same moment.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::json;
use tandem_e2e::bench::{Percentiles, outbox, restart, saga, txn, unary};

/// A scenario of `tandem bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
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
            Scenario::Restart => "restart",
        }
    }

    fn needs_postgres(self) -> bool {
        matches!(
            self,
            Scenario::TxnPostgres | Scenario::TxnPostgresStore | Scenario::Outbox
        )
    }

    const ALL: [Scenario; 7] = [
        Scenario::Txn,
        Scenario::TxnSqlite,
        Scenario::TxnPostgres,
        Scenario::TxnPostgresStore,
        Scenario::Outbox,
        Scenario::Unary,
        Scenario::Saga,
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
    /// Transactions per second in the paced phase (default: half of the
    /// scenario's own peak in that round).
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
    /// Print the results as one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

struct Row {
    scenario: Scenario,
    round: u32,
    committed_per_s: f64,
    applied_per_s: f64,
    /// This process's CPU per applied transaction, µs (not PostgreSQL's).
    cpu_us: Option<f64>,
    stages_ms: Option<[f64; 3]>,
    paced_per_s: f64,
    latency: Percentiles,
}

/// Runs `tandem bench`, writing the report to `out`.
pub async fn bench(args: BenchArgs, out: &mut impl Write) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.seconds > 0.0 && args.seconds.is_finite(),
        "--seconds must be a positive number of seconds"
    );
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!(args.workers > 0, "--workers must be at least 1");
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
    if let Some(p) = args.paced {
        anyhow::ensure!(p > 0.0 && p.is_finite(), "--paced must be a positive rate");
    }
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
    // Listening from the start: a Ctrl-C while the bench's own PostgreSQL
    // starts must stop it too, not kill the bench and leave the server.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the signal handlers")?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the signal handlers")?;
    let scenarios = if args.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenarios.clone()
    };
    let dir = tempfile::Builder::new()
        .prefix("tandem-bench-")
        .tempdir_in(std::env::temp_dir())?;
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
    let ratios = ratios(&rows);
    if args.json {
        let doc = json!({
            "tandem_version": env!("CARGO_PKG_VERSION"),
            "finished_unix_s": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "complete": outcome.is_ok(),
            "seconds_per_phase": args.seconds,
            "workers": args.workers,
            "batch": args.batch,
            "outbox": {"clients": args.clients, "relays": args.relays, "relay_batch": args.relay_batch},
            "postgres": match (&args.postgres, &postgres_version) {
                (_, None) => json!(null),
                (Some(_), Some(v)) => json!({"server": "given", "version": v}),
                (None, Some(v)) => json!({"server": "own, fsync on", "version": v}),
            },
            "results": rows.iter().map(|r| json!({
                "scenario": r.scenario.name(),
                "round": r.round,
                "committed_per_s": r.committed_per_s.round(),
                "applied_per_s": r.applied_per_s.round(),
                "cpu_us_per_txn": r.cpu_us.map(f64::round),
                "mean_begin_local_commit_ms": r.stages_ms.map(|m| m.map(|x| (x * 100.0).round() / 100.0)),
                "paced_per_s": r.paced_per_s.round(),
                "p50_ms": r.latency.p50_ms,
                "p99_ms": r.latency.p99_ms,
                "max_ms": r.latency.max_ms,
                "samples": r.latency.samples,
            })).collect::<Vec<_>>(),
            "over_outbox": ratios.iter().map(|(s, round, x)| json!({
                "scenario": s.name(), "round": round, "applied_ratio": x,
            })).collect::<Vec<_>>(),
            "restart": restarts.iter().map(|(round, r)| json!({
                "round": round,
                "open": r.open,
                "prepared_per_s": r.prepared_per_s.round(),
                "stop_s": r.stop.as_secs_f64(),
                "open_s": r.open_time.as_secs_f64(),
                "serving_s": r.serving.as_secs_f64(),
                "open_after": r.open_after,
                "rss_mib": r.rss_mib.round(),
                "check_after_ms": args.check_after_ms,
                "checks_in_10_s": r.checks,
                "busiest_second": r.busiest_second,
            })).collect::<Vec<_>>(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        if !rows.is_empty() {
            table(&rows, &ratios, out)?;
        }
        for (round, r) in &restarts {
            writeln!(
                out,
                "restart, round {round}: {} open half messages (prepared at {:.0}/s); clean stop \
                 {:.2} s; open {:.2} s; serving {:.2} s after the open began, {} open; {:.0} MiB \
                 resident (this process); check-backs in the 10 s after a session connected: {} \
                 ({} in the busiest second; check_after_ms {})",
                r.open,
                r.prepared_per_s,
                r.stop.as_secs_f64(),
                r.open_time.as_secs_f64(),
                r.serving.as_secs_f64(),
                r.open_after,
                r.rss_mib,
                r.checks,
                r.busiest_second,
                args.check_after_ms
            )?;
        }
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
            let row = if scenario == Scenario::Saga {
                let r = saga::run(
                    &saga::Options {
                        seconds,
                        workers: args.workers,
                        paced: args.paced,
                        dir: dir.join(format!("{round}-saga")),
                    },
                    &label,
                )
                .await
                .with_context(context)?;
                Row {
                    scenario,
                    round,
                    committed_per_s: r.started_per_s,
                    applied_per_s: r.done_per_s,
                    cpu_us: Some(r.cpu_us),
                    stages_ms: None,
                    paced_per_s: r.paced_per_s,
                    latency: r.latency,
                }
            } else if scenario == Scenario::Unary {
                let r = unary::run(
                    &unary::Options {
                        seconds,
                        workers: args.workers,
                        paced: args.paced,
                    },
                    &label,
                )
                .await
                .with_context(context)?;
                Row {
                    scenario,
                    round,
                    committed_per_s: r.calls_per_s,
                    applied_per_s: r.window_per_s,
                    cpu_us: Some(r.cpu_us),
                    stages_ms: None,
                    paced_per_s: r.paced_per_s,
                    latency: r.latency,
                }
            } else if scenario == Scenario::Outbox {
                let r = outbox::run(
                    &outbox::Options {
                        seconds,
                        clients: args.clients,
                        relays: args.relays,
                        batch: args.relay_batch,
                        paced: args.paced,
                        server: server()?,
                    },
                    &label,
                )
                .await
                .with_context(context)?;
                Row {
                    scenario,
                    round,
                    committed_per_s: r.committed_per_s,
                    applied_per_s: r.applied_per_s,
                    cpu_us: None,
                    stages_ms: None,
                    paced_per_s: r.paced_per_s,
                    latency: r.latency,
                }
            } else {
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
                        paced: args.paced,
                        batch: args.batch,
                        tables,
                        coordinator_on,
                        shards: args.shards,
                        group_commit_wait: args
                            .group_commit_wait_us
                            .map(std::time::Duration::from_micros),
                        dir: dir.join(format!("{round}-{}", scenario.name())),
                    },
                    &label,
                )
                .await
                .with_context(context)?;
                Row {
                    scenario,
                    round,
                    committed_per_s: r.committed_per_s,
                    applied_per_s: r.applied_per_s,
                    cpu_us: Some(r.cpu_us),
                    stages_ms: Some(r.stages_ms),
                    paced_per_s: r.paced_per_s,
                    latency: r.latency,
                }
            };
            rows.push(row);
        }
    }
    Ok(())
}

/// Applied/s of each PostgreSQL-tables scenario over the outbox's in the
/// same round.
fn ratios(rows: &[Row]) -> Vec<(Scenario, u32, f64)> {
    rows.iter()
        .filter(|r| {
            matches!(
                r.scenario,
                Scenario::TxnPostgres | Scenario::TxnPostgresStore
            )
        })
        .filter_map(|r| {
            let base = rows
                .iter()
                .find(|b| b.scenario == Scenario::Outbox && b.round == r.round)?;
            Some((r.scenario, r.round, r.applied_per_s / base.applied_per_s))
        })
        .collect()
}

fn table(
    rows: &[Row],
    ratios: &[(Scenario, u32, f64)],
    out: &mut impl Write,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "{:<20} {:>5} {:>12} {:>12} {:>7} {:>22} {:>9} {:>9} {:>9}",
        "scenario",
        "round",
        "committed/s",
        "applied/s",
        "CPU µs",
        "Begin/local/Commit ms",
        "paced/s",
        "p50 ms",
        "p99 ms"
    )?;
    for r in rows {
        let stages = match r.stages_ms {
            None => "-".to_owned(),
            Some([b, _, c]) if r.scenario == Scenario::Txn => format!("{b:.2}/-/{c:.2}"),
            Some([b, l, c]) => format!("{b:.2}/{l:.2}/{c:.2}"),
        };
        writeln!(
            out,
            "{:<20} {:>5} {:>12.0} {:>12.0} {:>7} {:>22} {:>9.0} {:>9.2} {:>9.2}",
            r.scenario.name(),
            r.round,
            r.committed_per_s,
            r.applied_per_s,
            r.cpu_us
                .filter(|c| c.is_finite())
                .map_or("-".to_owned(), |c| format!("{c:.0}")),
            stages,
            r.paced_per_s,
            r.latency.p50_ms,
            r.latency.p99_ms
        )?;
    }
    for (s, round, x) in ratios {
        writeln!(
            out,
            "round {round}: {} applied/s over outbox applied/s: {x:.2}",
            s.name()
        )?;
    }
    writeln!(
        out,
        "committed/s: over the whole peak phase; applied/s: effects applied by the consumer over \
         its last 80 % (unary: calls answered; saga: sagas started, and sagas whose last branch's \
         effect is committed); CPU µs: this process's CPU per applied effect over \
         that window (PostgreSQL's is not in it); p50/p99: Begin (the outbox: its local transaction; \
         saga: StartSaga) -> effect applied, in \
         the paced phase, at the rate shown (each scenario's own half peak unless --paced sets one)"
    )?;
    Ok(())
}
