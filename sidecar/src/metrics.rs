//! The sidecar's Prometheus metrics, written at each scrape from its
//! counters (the same ones `GetStats` answers with).

use tandem_proto::sidecar as sc;
use tandem_runtime::metrics::{Exposition, Type};

/// The text of one scrape of a sidecar whose counters read `s`.
pub(crate) fn render(s: &sc::Stats) -> String {
    let mut out = Exposition::new();
    let counters: [(&str, &str, u64); 12] = [
        (
            "tandem_sidecar_deliveries_total",
            "Deliveries received from the coordinator.",
            s.delivered,
        ),
        (
            "tandem_sidecar_duplicates_skipped_total",
            "Deliveries acknowledged without calling the app: already in tandem_inbox.",
            s.duplicates_skipped,
        ),
        (
            "tandem_sidecar_handled_total",
            "HandleMessage calls that succeeded.",
            s.handled,
        ),
        (
            "tandem_sidecar_handler_failures_total",
            "HandleMessage attempts that failed: each one the app answered with an error or let time out, and once each message given up after the app's connection kept breaking.",
            s.handler_failures,
        ),
        (
            "tandem_sidecar_dead_lettered_total",
            "Messages published to their topic's .dlq after max_attempts failures.",
            s.dead_lettered,
        ),
        (
            "tandem_sidecar_dead_letter_failures_total",
            "Times a message given up could not be published to its .dlq either (it comes again, and counts again).",
            s.dead_letter_failures,
        ),
        (
            "tandem_sidecar_check_backs_answered_total",
            "Check-backs of the coordinator this sidecar answered.",
            s.check_backs_answered,
        ),
        (
            "tandem_sidecar_claim_waits_total",
            "Deliveries that found their message claimed by another sidecar of the group and waited.",
            s.claim_waits,
        ),
        (
            "tandem_sidecar_redriven_for_other_groups_total",
            "Deliveries acknowledged without calling the app: a redrive from the dead-letter topic addressed them to another group.",
            s.redriven_for_other_groups,
        ),
        (
            "tandem_sidecar_sequence_gaps_total",
            "Holes in the offsets the coordinator delivered for one holding of a partition (messages skipped: each is logged with its range).",
            s.sequence_gaps,
        ),
        (
            "tandem_sidecar_sequence_gap_messages_total",
            "Offsets the sequence gaps span.",
            s.sequence_gap_messages,
        ),
        (
            "tandem_sidecar_retention_skipped_total",
            "Offsets retention removed while a holding of a partition was reading them, before they were delivered.",
            s.retention_skipped,
        ),
    ];
    for (name, help, value) in counters {
        out.single(name, Type::Counter, help, value as f64);
    }
    out.family(
        "tandem_sidecar_transactions_total",
        Type::Counter,
        "Commit and Rollback calls of the app the coordinator answered, by the outcome asked (an app's retry counts again; check-back decisions are not here).",
    )
    .sample(
        "tandem_sidecar_transactions_total",
        &[("outcome", "committed")],
        s.transactions_committed as f64,
    )
    .sample(
        "tandem_sidecar_transactions_total",
        &[("outcome", "rolled_back")],
        s.transactions_rolled_back as f64,
    );
    out.finish()
}
