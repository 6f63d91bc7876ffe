//! The coordinator's Prometheus metrics, written at each scrape from the
//! shards this replica serves (a replica reports only its own shards, so
//! Prometheus sums the replicas): partitions and their offsets, consumer
//! groups and their lag, sidecar sessions, and per shard transactions by
//! outcome, check-backs and open half messages. The transaction counters carry a
//! `shard` label: a shard that moves to another replica takes its series
//! with it, so no counter a replica reports ever goes down.

use tandem_proto::coordinator as pb;
use tandem_runtime::metrics::{Exposition, Type};

use tandem_storage::TopicPartition;

use crate::cluster::Cluster;

/// One partition as scraped.
struct PartitionRow {
    topic: String,
    partition: String,
    offsets: tandem_storage::Offsets,
}

/// One group's committed position on one partition.
struct GroupRow {
    group: String,
    topic: String,
    partition: String,
    committed: u64,
    lag: u64,
}

/// The text of one scrape.
pub(crate) async fn render<L: tandem_storage::Log + Clone>(
    cluster: &Cluster<L>,
    sync_times: Option<&tandem_storage::SyncTimes>,
) -> String {
    let mut partitions = Vec::new();
    let mut positions = Vec::new();
    let mut members = Vec::new();
    let mut shards: Vec<(String, pb::Stats)> = Vec::new();
    for (shard, broker) in cluster.local() {
        shards.push((shard.to_string(), broker.txns.stats()));
        // One pass over each table, whatever the number of topics.
        let committed = broker.offsets.all();
        let mut hwm: std::collections::HashMap<(String, u32), tandem_storage::Offsets> =
            std::collections::HashMap::new();
        for (topic, meta) in broker.list_topics() {
            for p in 0..meta.partitions {
                // A topic deleted meanwhile is simply absent from this scrape.
                let Ok(offsets) = broker.data.offsets(&TopicPartition::new(&topic, p)) else {
                    continue;
                };
                hwm.insert((topic.clone(), p), offsets);
                partitions.push(PartitionRow {
                    topic: topic.clone(),
                    partition: p.to_string(),
                    offsets,
                });
            }
        }
        // Only where the group committed: where a group without a commit
        // starts depends on its members' StartFrom.
        for ((topic, group), by_partition) in committed {
            for (p, offset) in by_partition {
                let Some(o) = hwm.get(&(topic.clone(), p)) else {
                    continue;
                };
                // Offsets below the log's start are gone: not lag.
                let from = offset.max(o.log_start);
                positions.push(GroupRow {
                    group: group.clone(),
                    topic: topic.clone(),
                    partition: p.to_string(),
                    committed: offset,
                    lag: o.high_water_mark.saturating_sub(from),
                });
            }
        }
        members.extend(
            broker
                .groups
                .member_counts()
                .into_iter()
                .map(|((topic, group), n)| (group, topic, n)),
        );
    }
    let mut out = Exposition::new();
    type Field = fn(&tandem_storage::Offsets) -> u64;
    let partition_families: [(&str, &str, Field); 3] = [
        (
            "tandem_partition_high_water_mark",
            "Next offset to be written in a topic partition: messages appended to it so far.",
            |o| o.high_water_mark,
        ),
        (
            "tandem_partition_log_start_offset",
            "First offset a topic partition still holds (older ones were removed by retention).",
            |o| o.log_start,
        ),
        (
            "tandem_partition_size_bytes",
            "Bytes a topic partition takes on disk.",
            |o| o.size_bytes,
        ),
    ];
    for (name, help, field) in partition_families {
        out.family(name, Type::Gauge, help);
        for p in &partitions {
            out.sample(
                name,
                &[("topic", &p.topic), ("partition", &p.partition)],
                field(&p.offsets) as f64,
            );
        }
    }
    type Position = fn(&GroupRow) -> u64;
    let group_families: [(&str, &str, Position); 2] = [
        (
            "tandem_consumer_group_committed_offset",
            "Offset a consumer group has committed on a partition (the next one it will read).",
            |g| g.committed,
        ),
        (
            "tandem_consumer_group_lag_messages",
            "Messages of a partition after a consumer group's committed offset (partitions it has committed on).",
            |g| g.lag,
        ),
    ];
    for (name, help, field) in group_families {
        out.family(name, Type::Gauge, help);
        for g in &positions {
            out.sample(
                name,
                &[
                    ("group", &g.group),
                    ("topic", &g.topic),
                    ("partition", &g.partition),
                ],
                field(g) as f64,
            );
        }
    }
    out.family(
        "tandem_consumer_group_members",
        Type::Gauge,
        "Live members of a consumer group on a topic (a group in the middle of a rebalance is left out of that scrape).",
    );
    for (group, topic, n) in &members {
        out.sample(
            "tandem_consumer_group_members",
            &[("group", group), ("topic", topic)],
            *n as f64,
        );
    }
    let (sessions, awaiting) = cluster.sessions.counts();
    out.family(
        "tandem_sidecar_sessions",
        Type::Gauge,
        "Sessions of a service's sidecars open with this replica (check-backs and saga branches travel on them).",
    );
    for (service, n) in &sessions {
        out.sample(
            "tandem_sidecar_sessions",
            &[("service", service)],
            *n as f64,
        );
    }
    out.single(
        "tandem_check_backs_awaiting_answer",
        Type::Gauge,
        "Check-backs sent and not yet answered.",
        awaiting as f64,
    );
    type Stat = fn(&pb::Stats) -> u64;
    let per_shard: [(&str, Type, &str, Stat); 5] = [
        (
            "tandem_transactions_prepared_total",
            Type::Counter,
            "Half messages prepared.",
            |s| s.prepared,
        ),
        (
            "tandem_check_backs_sent_total",
            Type::Counter,
            "Check-backs that fell due and were started (sent when the service has a session).",
            |s| s.checks_sent,
        ),
        (
            "tandem_transactions_resolved_by_check_total",
            Type::Counter,
            "Transactions a check-back (or the final action) decided.",
            |s| s.resolved_by_check,
        ),
        (
            "tandem_final_actions_total",
            Type::Counter,
            "Transactions decided by the final action after max_checks check-backs without an answer.",
            |s| s.final_actions,
        ),
        (
            "tandem_open_half_messages",
            Type::Gauge,
            "Half messages prepared and not yet decided.",
            |s| s.open,
        ),
    ];
    for (name, kind, help, stat) in per_shard {
        out.family(name, kind, help);
        for (shard, s) in &shards {
            out.sample(name, &[("shard", shard)], stat(s) as f64);
        }
    }
    out.family(
        "tandem_transactions_ended_total",
        Type::Counter,
        "Transactions decided, by outcome.",
    );
    for (shard, s) in &shards {
        out.sample(
            "tandem_transactions_ended_total",
            &[("shard", shard), ("outcome", "committed")],
            s.committed as f64,
        )
        .sample(
            "tandem_transactions_ended_total",
            &[("shard", shard), ("outcome", "rolled_back")],
            s.rolled_back as f64,
        );
    }
    if let Some(t) = sync_times {
        sync_histogram(&mut out, t);
    }
    out.finish()
}

/// The embedded store's sync times, in seconds.
fn sync_histogram(out: &mut Exposition, t: &tandem_storage::SyncTimes) {
    const NAME: &str = "tandem_log_sync_seconds";
    out.family(
        NAME,
        Type::Histogram,
        "Time the embedded store's fdatasync rounds for appends took (the journal's, or with it the segment files written directly; not the background checkpoints'); with fsync always, every acknowledged publish and prepare waits for one.",
    );
    let counts = t.counts();
    let mut below = 0;
    for (i, n) in counts.iter().enumerate() {
        below += n;
        let le = tandem_storage::SyncTimes::BOUNDS_US
            .get(i)
            .map_or_else(|| "+Inf".to_owned(), |us| (*us as f64 / 1e6).to_string());
        out.sample(&format!("{NAME}_bucket"), &[("le", &le)], below as f64);
    }
    out.sample(&format!("{NAME}_sum"), &[], t.sum().as_secs_f64())
        .sample(&format!("{NAME}_count"), &[], below as f64);
}
