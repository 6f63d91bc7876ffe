//! `tandem topic create|list|describe|add-partitions|delete`.

use std::io::Write;

use tandem_proto::coordinator as pb;

use crate::{connect, status};

/// Topic administration.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum TopicCommand {
    /// Creates a topic.
    Create {
        /// Topic name.
        name: String,
        /// Number of partitions.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
    },
    /// Lists topics.
    List,
    /// Shows partitions, high-water marks and each group's lag.
    Describe {
        /// Topic name.
        name: String,
    },
    /// Deletes a topic, its messages and every group's offsets on it;
    /// refused while a group has members on it or a transaction for it is
    /// open.
    Delete {
        /// Topic name.
        name: String,
        /// Prints one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Gives a topic more partitions. Consumer groups get the new ones at
    /// once, each starting them at their beginning; keys are hashed over
    /// the new count from then on, so a key's later messages may go to
    /// another partition than its earlier ones (per-key order holds on each
    /// side of the change, not across it).
    AddPartitions {
        /// Topic name.
        name: String,
        /// The new total number of partitions.
        #[arg(long)]
        partitions: u32,
        /// Prints one JSON document.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a topic command against the coordinator at `url`, writing to `out`.
pub async fn topic(url: &str, cmd: TopicCommand, out: &mut impl Write) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    match cmd {
        TopicCommand::Create { name, partitions } => {
            c.create_topic(pb::CreateTopicRequest {
                name: name.clone(),
                partitions,
            })
            .await
            .map_err(status)?;
            writeln!(out, "created topic {name} with {partitions} partitions")?;
        }
        TopicCommand::Delete { name, json } => {
            c.delete_topic(pb::DeleteTopicRequest { name: name.clone() })
                .await
                .map_err(status)?;
            if json {
                writeln!(out, "{}", serde_json::json!({"deleted": name}))?;
            } else {
                writeln!(out, "deleted topic {name}")?;
            }
        }
        TopicCommand::AddPartitions {
            name,
            partitions,
            json,
        } => {
            let r = c
                .add_partitions(pb::AddPartitionsRequest {
                    name: name.clone(),
                    partitions,
                })
                .await
                .map_err(status)?
                .into_inner();
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"topic": name, "previous": r.previous, "partitions": r.partitions})
                )?;
            } else {
                writeln!(
                    out,
                    "topic {name}: {} partitions, was {}",
                    r.partitions, r.previous
                )?;
            }
        }
        TopicCommand::List => {
            let topics = c
                .list_topics(pb::ListTopicsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            for t in topics.topics {
                writeln!(out, "{}\t{}", t.name, t.partitions)?;
            }
        }
        TopicCommand::Describe { name } => {
            let d = c
                .describe_topic(pb::DescribeTopicRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            writeln!(out, "topic {} ({} partitions)", d.name, d.partitions.len())?;
            if !d.owner.is_empty() {
                writeln!(
                    out,
                    "shard {} of {}, served by {}",
                    d.shard, d.shards, d.owner
                )?;
            }
            writeln!(
                out,
                "{:>9} {:>12} {:>16} {:>12}",
                "partition", "log start", "high-water mark", "bytes"
            )?;
            for p in &d.partitions {
                writeln!(
                    out,
                    "{:>9} {:>12} {:>16} {:>12}",
                    p.partition, p.log_start, p.high_water_mark, p.size_bytes
                )?;
            }
            for g in &d.groups {
                writeln!(
                    out,
                    "group {} ({} members): lag {}",
                    g.group, g.members, g.total_lag
                )?;
                for p in &g.partitions {
                    writeln!(
                        out,
                        "{:>9} committed {:>12} lag {:>10}",
                        p.partition, p.committed_offset, p.lag
                    )?;
                }
                for m in &g.member_info {
                    writeln!(
                        out,
                        "   member {}: credit {}, partitions {:?}",
                        m.id, m.credit, m.partitions
                    )?;
                }
            }
        }
    }
    Ok(())
}
