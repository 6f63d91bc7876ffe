//! `tandem audit`: whether a producer service's database, the coordinator
//! and the consumers' databases agree, transaction by transaction.
//!
//! It reads, and changes nothing:
//! - the producer's `tandem_txn` (table mode: the app's row says its local
//!   transaction committed; the sidecar's `rolled_back` marker says a
//!   check-back found nothing and fenced it);
//! - every transaction of the service the coordinator remembers, with its
//!   state and position, and each consumer group's committed offsets;
//! - each audited group's `tandem_inbox` (its dedup rows).
//!
//! Inconsistencies (exit code 1):
//! - committed by the coordinator, but the producer's local transaction
//!   did not commit (no row, or the rollback marker);
//! - rolled back by the coordinator, but committed locally (a lost
//!   message);
//! - committed locally, remembered by nobody (the coordinator does not know
//!   the transaction, though the row is younger than `--window`);
//! - committed locally in a transaction of another service (the wrong
//!   `--service` or database);
//! - rolled back, yet in a consumer's inbox (delivered but rolled back);
//! - committed and acknowledged by a group (below its committed offset),
//!   but not in its inbox (acknowledged without its effect recorded);
//! - prepared for longer than `--stuck-after` (stuck in check-back).
//!
//! Not inconsistencies, reported: committed messages a group has not
//! reached yet (its lag).
//!
//! Limits: only transactions the coordinator still remembers are audited
//! (open ones, and finished ones for `txn_retention_ms`, 5 minutes by
//! default): run it more often than that. Transactions whose producer
//! answers check-backs from its app (callback mode) have no `tandem_txn`
//! row to compare with, and a group consuming without a dedup table
//! (`DEDUP_MODE_OFF`) has no `tandem_inbox` rows: those checks are skipped
//! for them, and the report says so. A dead-lettered message has its dedup
//! row, so it counts as handled (`tandem dlq show` lists it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::str::FromStr;

use serde_json::{Value, json};
use sqlx::Row;
use tandem_proto::coordinator as pb;
use tandem_proto::sidecar as sc;

use crate::clock::{format_ms, now_ms};
use crate::operate::state_name;
use crate::{connect, status};

/// Flags of `tandem audit`.
#[derive(Clone, Debug, clap::Args)]
pub struct AuditArgs {
    /// The producer service (its sidecar's --service).
    #[arg(long)]
    pub service: String,
    /// The producer's database, holding `tandem_txn`: a SQLite file or a
    /// postgres:// URL.
    #[arg(long, value_name = "DB")]
    pub producer_db: String,
    /// A consumer group and the database holding its `tandem_inbox`, as
    /// GROUP=DB (repeat for more).
    #[arg(long = "consumer", value_name = "GROUP=DB", value_parser = parse_consumer)]
    pub consumers: Vec<(String, String)>,
    /// A transaction prepared longer ago than this (ms) is reported stuck.
    #[arg(long, default_value_t = 300_000)]
    pub stuck_after_ms: u64,
    /// Local rows younger than this (ms) must be known to the coordinator
    /// (keep it below the coordinator's txn_retention_ms).
    #[arg(long, default_value_t = 240_000)]
    pub window_ms: u64,
    /// Prints one JSON document.
    #[arg(long)]
    pub json: bool,
}

fn parse_consumer(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((g, db)) if !g.is_empty() && !db.is_empty() => Ok((g.to_owned(), db.to_owned())),
        _ => Err(format!("{s:?} is not GROUP=DB")),
    }
}

/// A database read by the audit, opened read-only where the driver allows.
enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Db {
    async fn open(what: &str) -> anyhow::Result<Db> {
        if what.starts_with("postgres://") || what.starts_with("postgresql://") {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(what)
                .await
                .map_err(|e| anyhow::anyhow!("cannot open {what}: {e}"))?;
            return Ok(Db::Postgres(pool));
        }
        let path = what.strip_prefix("sqlite://").unwrap_or(what);
        if !std::path::Path::new(path).exists() {
            anyhow::bail!("cannot open {what}: no such file");
        }
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
            .read_only(true);
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open {what}: {e}"))?;
        Ok(Db::Sqlite(pool))
    }

    /// Rows of a query whose columns are all text or integers, as strings.
    async fn rows(&self, sql: &'static str, binds: &[&str]) -> anyhow::Result<Vec<Vec<String>>> {
        macro_rules! run {
            ($pool:expr) => {{
                let mut q = sqlx::query(sql);
                for b in binds {
                    q = q.bind(*b);
                }
                q.fetch_all($pool)
                    .await?
                    .iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| {
                                r.try_get::<String, _>(i)
                                    .or_else(|_| r.try_get::<i64, _>(i).map(|n| n.to_string()))
                                    .unwrap_or_default()
                            })
                            .collect()
                    })
                    .collect()
            }};
        }
        Ok(match self {
            Db::Sqlite(p) => run!(p),
            Db::Postgres(p) => run!(p),
        })
    }

    /// The dedup mode `group` subscribed to `topic` with through the
    /// sidecar (its `tandem_subscription` row), if it did.
    async fn dedup_mode(&self, topic: &str, group: &str) -> anyhow::Result<Option<sc::DedupMode>> {
        const SQL: &str =
            "SELECT spec FROM tandem_subscription WHERE topic = $1 AND consumer_group = $2";
        let spec: Option<Vec<u8>> = match self {
            Db::Sqlite(p) => {
                sqlx::query_scalar(SQL)
                    .bind(topic)
                    .bind(group)
                    .fetch_optional(p)
                    .await
            }
            Db::Postgres(p) => {
                sqlx::query_scalar(SQL)
                    .bind(topic)
                    .bind(group)
                    .fetch_optional(p)
                    .await
            }
        }
        .or_else(|e| match e {
            // No such table: the app consumes without the sidecar's API.
            sqlx::Error::Database(_) => Ok(None),
            e => Err(e),
        })?;
        Ok(spec
            .and_then(|b| <sc::SubscribeRequest as prost::Message>::decode(b.as_slice()).ok())
            .map(|s| sc::DedupMode::try_from(s.dedup).unwrap_or(sc::DedupMode::Sidecar)))
    }

    async fn close(self) {
        match self {
            Db::Sqlite(p) => p.close().await,
            Db::Postgres(p) => p.close().await,
        }
    }
}

/// A Tandem sidecar's context of a transaction whose check-backs its app
/// answers (CHECK_MODE_CALLBACK, PublishTransactional).
const CALLBACK_CONTEXT: &[u8] = b"check=callback";

/// One inconsistency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Its kind (`committed-not-local`, `rolled-back-but-local`,
    /// `local-unknown`, `other-service`, `delivered-but-rolled-back`,
    /// `acked-not-recorded`, `stuck`).
    pub kind: &'static str,
    /// The transaction.
    pub txn_id: String,
    /// What was found.
    pub detail: String,
}

/// What `tandem audit` found.
#[derive(Debug, Default)]
pub struct Report {
    /// Transactions of the service by state, as the coordinator has them.
    pub by_state: BTreeMap<&'static str, u64>,
    /// Rows of `tandem_txn` read: (committed, rolled back).
    pub local_rows: (u64, u64),
    /// Transactions whose producer's app answers check-backs (callback
    /// mode): not compared with `tandem_txn`.
    pub callback_mode: u64,
    /// Per audited group and topic: messages not reached yet, and dedup
    /// rows read.
    pub consumers: Vec<ConsumerReport>,
    /// The inconsistencies.
    pub problems: Vec<Problem>,
}

/// One audited consumer group on one topic.
#[derive(Debug)]
pub struct ConsumerReport {
    /// The group.
    pub group: String,
    /// The topic.
    pub topic: String,
    /// Committed transactions of the service it has not reached yet.
    pub pending: u64,
    /// Its lag on the topic (every message, not only the service's).
    pub lag: u64,
    /// The group consumes without a dedup table: what it acknowledged is
    /// not compared with `tandem_inbox`.
    pub dedup_off: bool,
}

/// Audits `args.service` against the coordinator at `url`.
pub async fn audit_report(url: &str, args: &AuditArgs) -> anyhow::Result<Report> {
    let mut c = connect(url).await?;
    let mut report = Report::default();
    // Every transaction of the service the coordinator remembers, by pages.
    let mut txns: Vec<pb::Transaction> = Vec::new();
    loop {
        let (after_txn_id, after_prepared_at_ms) = txns
            .last()
            .map(|t| (t.txn_id.clone(), t.prepared_at_ms))
            .unwrap_or_default();
        let page = c
            .list_transactions(pb::ListTransactionsRequest {
                state: 0,
                service: args.service.clone(),
                limit: 10_000,
                after_txn_id,
                after_prepared_at_ms,
            })
            .await
            .map_err(status)?
            .into_inner();
        let more = page.matched > page.transactions.len() as u64;
        txns.extend(page.transactions);
        if !more {
            break;
        }
    }
    let now = now_ms();
    // Rows as old as the oldest transaction remembered, or the window,
    // and a minute more (SQLite's created_at has whole seconds).
    let since = txns
        .iter()
        .map(|t| t.prepared_at_ms)
        .min()
        .unwrap_or(now)
        .min(now.saturating_sub(args.window_ms as i64))
        .saturating_sub(60_000)
        .to_string();
    let producer = Db::open(&args.producer_db).await?;
    let mut local: HashMap<String, (bool, i64)> = HashMap::new();
    for row in producer
        .rows(
            "SELECT txn_id, state, created_at FROM tandem_txn WHERE created_at >= CAST($1 AS BIGINT)",
            &[&since],
        )
        .await
        .map_err(|e| anyhow::anyhow!("reading tandem_txn of {}: {e}", args.producer_db))?
    {
        let committed = row[1] == "committed";
        if committed {
            report.local_rows.0 += 1;
        } else {
            report.local_rows.1 += 1;
        }
        local.insert(row[0].clone(), (committed, row[2].parse().unwrap_or(0)));
    }
    producer.close().await;

    let known: HashSet<&str> = txns.iter().map(|t| t.txn_id.as_str()).collect();
    for t in &txns {
        *report.by_state.entry(state_name(t.state)).or_default() += 1;
        if t.context.as_ref() == CALLBACK_CONTEXT {
            // Its producer answers check-backs from its app, not from
            // tandem_txn: nothing there to compare with.
            report.callback_mode += 1;
            if pb::TransactionState::try_from(t.state) == Ok(pb::TransactionState::Prepared)
                && now.saturating_sub(t.prepared_at_ms) > args.stuck_after_ms as i64
            {
                report.problems.push(Problem {
                    kind: "stuck",
                    txn_id: t.txn_id.clone(),
                    detail: format!(
                        "prepared at {} and still open after {} check-backs",
                        format_ms(t.prepared_at_ms),
                        t.checks
                    ),
                });
            }
            continue;
        }
        let here = local.get(&t.txn_id).map(|(c, _)| *c);
        let problem = |kind, detail: String| Problem {
            kind,
            txn_id: t.txn_id.clone(),
            detail,
        };
        match (pb::TransactionState::try_from(t.state), here) {
            (Ok(pb::TransactionState::Committed), Some(true))
            | (Ok(pb::TransactionState::RolledBack), None | Some(false)) => {}
            (Ok(pb::TransactionState::Committed), local_state) => report.problems.push(problem(
                "committed-not-local",
                format!(
                    "its message was committed to {} but tandem_txn {}",
                    t.topic,
                    if local_state.is_some() {
                        "holds the rollback marker"
                    } else {
                        "has no row"
                    }
                ),
            )),
            (Ok(pb::TransactionState::RolledBack), Some(true)) => report.problems.push(problem(
                "rolled-back-but-local",
                format!(
                    "committed locally, but its message to {} was rolled back: consumers never get it",
                    t.topic
                ),
            )),
            (Ok(pb::TransactionState::Prepared), _)
                if now.saturating_sub(t.prepared_at_ms) > args.stuck_after_ms as i64 =>
            {
                report.problems.push(problem(
                    "stuck",
                    format!(
                        "prepared at {} and still open after {} check-backs",
                        format_ms(t.prepared_at_ms),
                        t.checks
                    ),
                ))
            }
            _ => {}
        }
    }
    // Rows whose transactions another service prepared: the database or
    // --service is not the one meant.
    let mut others: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (id, (committed, created)) in &local {
        if *committed
            && !known.contains(id.as_str())
            && now.saturating_sub(*created) < args.window_ms as i64
        {
            // Not listed: perhaps prepared by another service name, or
            // forgotten; asked directly before it is called unknown.
            match c
                .get_transaction(pb::GetTransactionRequest { txn_id: id.clone() })
                .await
            {
                Ok(t) if t.get_ref().service != args.service => {
                    others
                        .entry(t.into_inner().service)
                        .or_default()
                        .push(id.clone());
                }
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::NotFound => report.problems.push(Problem {
                    kind: "local-unknown",
                    txn_id: id.clone(),
                    detail: format!(
                        "committed locally at {} but the coordinator does not know the transaction",
                        format_ms(*created)
                    ),
                }),
                Err(s) => return Err(status(s)),
            }
        }
    }

    for (service, mut ids) in others {
        ids.sort();
        report.problems.push(Problem {
            kind: "other-service",
            txn_id: ids[0].clone(),
            detail: format!(
                "{} committed tandem_txn rows are transactions of service {service:?}, not {:?}: is --service (or --producer-db) the one meant?",
                ids.len(),
                args.service
            ),
        });
    }

    // Consumers: the groups given, on each topic the service's messages
    // went to.
    let topics: BTreeMap<&str, Vec<&pb::Transaction>> =
        txns.iter().fold(BTreeMap::new(), |mut m, t| {
            m.entry(t.topic.as_str()).or_insert_with(Vec::new).push(t);
            m
        });
    for (group, db_name) in &args.consumers {
        // The group's committed offsets first, its dedup rows after: a
        // message acknowledged between the two reads is then pending, not
        // reported as acknowledged without its row (the row is written
        // before the acknowledgement).
        let mut positions = Vec::new();
        for topic in topics.keys() {
            let d = c
                .describe_topic(pb::DescribeTopicRequest {
                    name: (*topic).to_owned(),
                })
                .await
                .map_err(status)?
                .into_inner();
            if let Some(g) = d.groups.into_iter().find(|g| g.group == *group) {
                positions.push((*topic, g));
            }
        }
        let db = Db::open(db_name).await?;
        let inbox: HashSet<(String, String)> = db
            .rows(
                "SELECT topic, message_id FROM tandem_inbox WHERE consumer_group = $1",
                &[group],
            )
            .await
            .map_err(|e| anyhow::anyhow!("reading tandem_inbox of {db_name}: {e}"))?
            .into_iter()
            .map(|r| (r[0].clone(), r[1].clone()))
            .collect();
        let mut dedup_off = HashSet::new();
        for (topic, _) in &positions {
            if db.dedup_mode(topic, group).await? == Some(sc::DedupMode::Off) {
                dedup_off.insert(*topic);
            }
        }
        db.close().await;
        let has = |topic: &str, id: &str| {
            inbox.contains(&(topic.to_owned(), id.to_owned()))
                || inbox.contains(&(String::new(), id.to_owned()))
        };
        for (topic, g) in positions {
            let off = dedup_off.contains(topic);
            let committed: HashMap<u32, u64> = g
                .partitions
                .iter()
                .map(|p| (p.partition, p.committed_offset))
                .collect();
            let mut pending = 0;
            for t in &topics[topic] {
                let state = pb::TransactionState::try_from(t.state);
                if state == Ok(pb::TransactionState::RolledBack) && has(topic, &t.txn_id) {
                    report.problems.push(Problem {
                        kind: "delivered-but-rolled-back",
                        txn_id: t.txn_id.clone(),
                        detail: format!("rolled back, yet group {group} recorded handling it"),
                    });
                }
                let Some(p) = t.position.as_ref() else {
                    continue;
                };
                let acked = committed.get(&p.partition).is_some_and(|&c| p.offset < c);
                if !acked {
                    pending += 1;
                } else if !off && !has(topic, &t.txn_id) {
                    report.problems.push(Problem {
                        kind: "acked-not-recorded",
                        txn_id: t.txn_id.clone(),
                        detail: format!(
                            "group {group} acknowledged {topic} {}/{} but its tandem_inbox has no row for it",
                            p.partition, p.offset
                        ),
                    });
                }
            }
            report.consumers.push(ConsumerReport {
                group: group.clone(),
                topic: topic.to_owned(),
                pending,
                lag: g.total_lag,
                dedup_off: off,
            });
        }
    }
    report
        .problems
        .sort_by(|a, b| (a.kind, &a.txn_id).cmp(&(b.kind, &b.txn_id)));
    Ok(report)
}

/// Runs `tandem audit`; returns whether everything agreed.
pub async fn audit(url: &str, args: AuditArgs, out: &mut impl Write) -> anyhow::Result<bool> {
    let report = audit_report(url, &args).await?;
    if args.json {
        let problems: Vec<Value> = report
            .problems
            .iter()
            .map(|p| json!({"kind": p.kind, "txn_id": p.txn_id, "detail": p.detail}))
            .collect();
        let consumers: Vec<Value> = report
            .consumers
            .iter()
            .map(
                |c| json!({"group": c.group, "topic": c.topic, "pending": c.pending, "lag": c.lag}),
            )
            .collect();
        writeln!(
            out,
            "{}",
            json!({
                "service": args.service,
                "transactions": report.by_state,
                "local_rows": {"committed": report.local_rows.0, "rolled_back": report.local_rows.1},
                "callback_mode": report.callback_mode,
                "consumers": consumers,
                "problems": problems,
                "consistent": report.problems.is_empty(),
            })
        )?;
    } else {
        let states: Vec<String> = report
            .by_state
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect();
        writeln!(
            out,
            "service {}: {} transactions remembered ({}); tandem_txn: {} committed, {} rolled back",
            args.service,
            report.by_state.values().sum::<u64>(),
            states.join(", "),
            report.local_rows.0,
            report.local_rows.1
        )?;
        if report.callback_mode > 0 {
            writeln!(
                out,
                "{} transactions answer check-backs from the app (callback mode): not compared with tandem_txn",
                report.callback_mode
            )?;
        }
        for c in &report.consumers {
            writeln!(
                out,
                "group {} on {}: {} of the service's messages not reached yet (lag {}){}",
                c.group,
                c.topic,
                c.pending,
                c.lag,
                if c.dedup_off {
                    "; dedup off: acknowledgements not compared with tandem_inbox"
                } else {
                    ""
                }
            )?;
        }
        for p in &report.problems {
            writeln!(out, "{:<26} {}: {}", p.kind, p.txn_id, p.detail)?;
        }
        writeln!(
            out,
            "{}",
            if report.problems.is_empty() {
                "consistent".to_owned()
            } else {
                format!("{} inconsistencies", report.problems.len())
            }
        )?;
    }
    Ok(report.problems.is_empty())
}
