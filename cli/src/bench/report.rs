//! What `tandem bench` prints: a table (aligned or Markdown) or one JSON
//! document, and the charts of `--plot`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde_json::json;
use tandem_e2e::bench::{restart, sidecar};

use super::plot::{Chart, Series, png};
use super::{BenchArgs, Row, Scenario};

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

/// Per round of the sidecar scenario: the differences of p50 and of p99
/// through the sidecar and straight to the coordinator at the main paced
/// rate (the same for both ways), that rate, and the sidecar's CPU per call
/// then and at peak.
fn sidecar_overheads(rows: &[Row]) -> Vec<(u32, f64, f64, f64, f64, f64)> {
    let case = |r: &&Row, case: &str| r.scenario == Scenario::Sidecar && r.case == Some(case);
    rows.iter()
        .filter(|r| case(r, sidecar::VIA))
        .filter_map(|via| {
            let direct = rows
                .iter()
                .find(|d| case(d, sidecar::DIRECT) && d.round == via.round)?;
            let (v, d) = (via.curve.first()?, direct.curve.first()?);
            Some((
                via.round,
                v.latency.p50_ms - d.latency.p50_ms,
                v.latency.p99_ms - d.latency.p99_ms,
                v.rate,
                via.cpu_us.unwrap_or(f64::NAN),
                via.sidecar_cpu_peak_us.unwrap_or(f64::NAN),
            ))
        })
        .collect()
}

/// A row's scenario, with its case when it has one.
fn name(r: &Row) -> String {
    match r.case {
        Some(case) => format!("{} {case}", r.scenario.name()),
        None => r.scenario.name().to_owned(),
    }
}

const HEADER: [&str; 11] = [
    "scenario",
    "round",
    "committed/s",
    "applied/s",
    "CPU µs",
    "fsync/op",
    "Begin/local/Commit ms",
    "latency at/s",
    "p50 ms",
    "p99 ms",
    "late p99 ms",
];

fn cells(r: &Row) -> [String; 11] {
    let stages = match r.stages_ms {
        None => "-".to_owned(),
        Some([b, _, c]) if r.scenario == Scenario::Txn => format!("{b:.2}/-/{c:.2}"),
        Some([b, l, c]) => format!("{b:.2}/{l:.2}/{c:.2}"),
    };
    let main = r.curve.first();
    let ms = |v: f64| format!("{v:.2}");
    [
        name(r),
        r.round.to_string(),
        format!("{:.0}", r.committed_per_s),
        format!("{:.0}", r.applied_per_s),
        r.cpu_us
            .filter(|c| c.is_finite())
            .map_or("-".to_owned(), |c| format!("{c:.0}")),
        r.fsyncs.map_or("-".to_owned(), |f| format!("{f:.3}")),
        stages,
        main.map_or("-".to_owned(), |p| format!("{:.0}", p.rate)),
        main.map_or("-".to_owned(), |p| ms(p.latency.p50_ms)),
        main.map_or("-".to_owned(), |p| ms(p.latency.p99_ms)),
        main.and_then(|p| p.late)
            .map_or("-".to_owned(), |l| ms(l.p99_ms)),
    ]
}

/// The table (aligned, or Markdown with `--markdown`), the ratios over the
/// outbox, the restarts, and what each column means.
pub(super) fn human(
    args: &BenchArgs,
    rows: &[Row],
    restarts: &[(u32, restart::Report)],
    out: &mut impl Write,
) -> anyhow::Result<()> {
    if !rows.is_empty() {
        let body: Vec<[String; 11]> = rows.iter().map(cells).collect();
        if args.markdown {
            writeln!(out, "| {} |", HEADER.join(" | "))?;
            writeln!(out, "|{}", "---|".repeat(HEADER.len()))?;
            for r in &body {
                writeln!(out, "| {} |", r.join(" | "))?;
            }
        } else {
            let mut widths = HEADER.map(|h| h.chars().count());
            for r in &body {
                for (w, c) in widths.iter_mut().zip(r) {
                    *w = (*w).max(c.chars().count());
                }
            }
            let line = |cells: &[String]| {
                cells
                    .iter()
                    .zip(widths)
                    .enumerate()
                    .map(|(i, (c, w))| {
                        let pad = " ".repeat(w - c.chars().count());
                        if i == 0 {
                            format!("{c}{pad}")
                        } else {
                            format!("{pad}{c}")
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("  ")
            };
            writeln!(out, "{}", line(&HEADER.map(str::to_owned)))?;
            for r in &body {
                writeln!(out, "{}", line(r))?;
            }
        }
        writeln!(out)?;
        for (s, round, x) in ratios(rows) {
            writeln!(
                out,
                "round {round}: {} applied/s over outbox applied/s: {x:.2}",
                s.name()
            )?;
        }
        for (round, added_p50, added_p99, rate, cpu_us, peak_us) in sidecar_overheads(rows) {
            writeln!(
                out,
                "round {round}: through the sidecar, p50 {added_p50:+.2} ms and p99 \
                 {added_p99:+.2} ms over straight to the coordinator at {rate:.0} calls/s; the \
                 sidecar process used {cpu_us:.0} µs of CPU per call then ({:.2} vCPU per 1 000 \
                 calls/s), {peak_us:.0} µs at peak",
                cpu_us / 1000.0
            )?;
        }
        writeln!(
            out,
            "committed/s: over the whole peak phase (pubsub: published; append: records); \
             applied/s: effects applied by the consumer over its last 80 % (unary: calls \
             answered; saga: sagas whose last branch's effect is committed; pubsub: messages \
             received); CPU µs: this process's CPU per applied unit over that window \
             (PostgreSQL's is not in it; sidecar: the sidecar process's, paced); fsync/op: the coordinator's fdatasync calls per \
             applied unit over that window (append: the log's per record); p50/p99: Begin (the \
             outbox: its local transaction; saga: StartSaga; pubsub: a publish call of 100) -> \
             effect applied, in the paced phase at the rate shown (each scenario's own half \
             peak unless --paced sets one; append: each append at its closed loop's rate), \
             measured from when each was due; pubsub, unary and sidecar: the call's own latency \
             (pubsub: publish -> durable acknowledgement); late p99: how late those calls \
             started after they were due (the pacer thread's timing, the wake-up of the task \
             starting them, the in-flight bound; part of p50/p99)"
        )?;
    }
    for (round, r) in restarts {
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
    Ok(())
}

/// Everything as one JSON document.
pub(super) fn json(
    args: &BenchArgs,
    rows: &[Row],
    restarts: &[(u32, restart::Report)],
    postgres: Option<String>,
    complete: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let two = |x: f64| (x * 100.0).round() / 100.0;
    let doc = json!({
        "tandem_version": env!("CARGO_PKG_VERSION"),
        "finished_unix_s": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "complete": complete,
        "seconds_per_phase": args.seconds,
        "workers": args.workers,
        "batch": args.batch,
        "message_bytes": args.message_bytes,
        "outbox": {"clients": args.clients, "relays": args.relays, "relay_batch": args.relay_batch},
        "postgres": postgres,
        "results": rows.iter().map(|r| {
            let main = r.curve.first();
            json!({
                "scenario": r.scenario.name(),
                "case": r.case,
                "round": r.round,
                "committed_per_s": r.committed_per_s.round(),
                "applied_per_s": r.applied_per_s.round(),
                "cpu_us_per_txn": r.cpu_us.filter(|c| c.is_finite()).map(f64::round),
                "fsyncs_per_op": r.fsyncs.map(|f| (f * 1000.0).round() / 1000.0),
                "mean_begin_local_commit_ms": r.stages_ms.map(|m| m.map(two)),
                "paced_per_s": main.map(|p| p.rate.round()),
                "p50_ms": main.map(|p| p.latency.p50_ms),
                "p99_ms": main.map(|p| p.latency.p99_ms),
                "max_ms": main.map(|p| p.latency.max_ms),
                "samples": main.map(|p| p.latency.samples),
                "late_p50_ms": main.and_then(|p| p.late).map(|l| l.p50_ms),
                "late_p99_ms": main.and_then(|p| p.late).map(|l| l.p99_ms),
                "curve": r.curve.iter().map(|p| json!({
                    "rate_per_s": p.rate.round(),
                    "p50_ms": p.latency.p50_ms,
                    "p99_ms": p.latency.p99_ms,
                    "samples": p.latency.samples,
                    "late_p50_ms": p.late.map(|l| l.p50_ms),
                    "late_p99_ms": p.late.map(|l| l.p99_ms),
                })).collect::<Vec<_>>(),
            })
        }).collect::<Vec<_>>(),
        "over_outbox": ratios(rows).iter().map(|(s, round, x)| json!({
            "scenario": s.name(), "round": round, "applied_ratio": x,
        })).collect::<Vec<_>>(),
        "sidecar_overhead": sidecar_overheads(rows).iter().map(|(round, p50, p99, rate, cpu, peak)| json!({
            "round": round,
            "worker_threads": args.sidecar_threads,
            "rate_per_s": rate.round(),
            "p50_difference_ms": two(*p50),
            "p99_difference_ms": two(*p99),
            "sidecar_cpu_us_per_call": cpu.round(),
            "vcpu_per_1000_calls_per_s": (cpu / 10.0).round() / 100.0,
            "sidecar_cpu_us_per_call_at_peak": peak.round(),
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
    Ok(())
}

/// Colours of the rounds' p50 and p99 series: blues and reds, darker for
/// later rounds.
const P50: [[u8; 3]; 3] = [[90, 140, 230], [40, 90, 200], [20, 50, 140]];
const P99: [[u8; 3]; 3] = [[235, 110, 90], [200, 50, 40], [140, 25, 20]];
/// The sidecar scenario's calls straight to the coordinator: greens.
const DIRECT_P50: [u8; 3] = [60, 160, 90];
const DIRECT_P99: [u8; 3] = [30, 110, 50];

/// One chart per scenario in `dir`: p50 and p99 latency over the rate, per
/// round, with the round's peak marked (append: one point per case, raw
/// baselines marked).
pub(super) fn plots(rows: &[Row], dir: &Path) -> anyhow::Result<()> {
    let mut scenarios: Vec<Scenario> = rows.iter().map(|r| r.scenario).collect();
    scenarios.sort_by_key(|s| s.name());
    scenarios.dedup();
    for scenario in scenarios {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.scenario == scenario).collect();
        let mut series = Vec::new();
        let mut marks = Vec::new();
        if scenario == Scenario::Append {
            let cases: Vec<&&Row> = mine.iter().filter(|r| !r.curve.is_empty()).collect();
            for (name, pick, color) in [("p50", 0, P50[1]), ("p99", 1, P99[1])] {
                let points = cases
                    .iter()
                    .filter_map(|r| r.curve.first())
                    .map(|p| {
                        let l = p.latency;
                        (p.rate, if pick == 0 { l.p50_ms } else { l.p99_ms })
                    })
                    .collect();
                // the cases named once, beside their p99
                let labels = if pick == 1 {
                    cases
                        .iter()
                        .map(|r| {
                            let case = r.case.unwrap_or_default();
                            let case = case.strip_prefix("log ").unwrap_or(case);
                            format!("{case} r{}", r.round)
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                series.push(Series {
                    name: format!("{name}, one point per log case"),
                    color,
                    points,
                    joined: false,
                    labels,
                });
            }
            for r in mine.iter().filter(|r| r.curve.is_empty()) {
                if r.case == Some(tandem_e2e::bench::append::RAW_RECORD) {
                    marks.push((r.applied_per_s, format!("raw fsync each r{}", r.round)));
                }
            }
        } else {
            for r in &mine {
                let shade = (r.round as usize - 1).min(2);
                let (p50, p99, case) = match r.case {
                    Some(c) if c == sidecar::DIRECT => (DIRECT_P50, DIRECT_P99, " direct"),
                    Some(_) => (P50[shade], P99[shade], " via"),
                    None => (P50[shade], P99[shade], ""),
                };
                let mut by_rate: Vec<_> = r.curve.iter().collect();
                by_rate.sort_by(|a, b| a.rate.total_cmp(&b.rate));
                for (name, color, pick) in [("p50", p50, 0), ("p99", p99, 1)] {
                    series.push(Series {
                        name: format!("{name}{case} round {}", r.round),
                        color,
                        points: by_rate
                            .iter()
                            .map(|p| {
                                let l = p.latency;
                                (p.rate, if pick == 0 { l.p50_ms } else { l.p99_ms })
                            })
                            .collect(),
                        joined: true,
                        labels: Vec::new(),
                    });
                }
                marks.push((r.applied_per_s, format!("peak{case} r{}", r.round)));
            }
        }
        let chart = Chart {
            title: format!("tandem bench {}", scenario.name()),
            x_label: format!("{} per second", scenario.unit()),
            y_label: "latency ms".into(),
            series,
            marks,
        };
        let path = dir.join(format!("{}.png", scenario.name()));
        std::fs::write(&path, png(&chart))
            .with_context(|| format!("--plot: writing {}", path.display()))?;
    }
    Ok(())
}
