//! The operator's commands: consumer groups (list, reset, replay), a topic
//! read without a group, transactions (list, show) and the dead-letter
//! topics (show, redrive). Each prints a table, or one JSON document with
//! `--json`. None commits an offset except `group reset|replay`, which is
//! refused while the group has members.

use std::collections::BTreeMap;
use std::io::Write;

use bytes::Bytes;
use serde_json::{Value, json};
use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::clock::{format_ms, now_ms, parse_time};
use crate::{bytes_json, connect, status};

/// Consumer groups.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum GroupCommand {
    /// Lists consumer groups per topic, with their members and lag.
    List {
        /// Only the groups of this topic.
        #[arg(long)]
        topic: Option<String>,
        /// Prints one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Moves a group's committed offsets on a topic: back to deliver again,
    /// forward to skip. Refused while the group has members on the topic.
    Reset {
        /// The consumer group.
        group: String,
        /// Its topic.
        #[arg(long)]
        topic: String,
        /// Where to (one of the four).
        #[command(flatten)]
        to: ResetTarget,
        /// Only this partition (repeat for more; default: all).
        #[arg(long = "partition")]
        partitions: Vec<u32>,
        /// Prints one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Delivers again to a group what its topic holds from a time on (a
    /// reset to that time that never moves an offset forward: a partition
    /// the group has not reached that time on keeps its offset). Sidecars
    /// with a dedup table skip the messages they handled before.
    Replay {
        /// The consumer group.
        group: String,
        /// Its topic.
        #[arg(long)]
        topic: String,
        /// From when: ms since the epoch, a span ago (`15m`, `2h`, `7d`) or
        /// an RFC 3339 time.
        #[arg(long, value_name = "TIME")]
        since: String,
        /// Only this partition (repeat for more; default: all).
        #[arg(long = "partition")]
        partitions: Vec<u32>,
        /// Prints one JSON document.
        #[arg(long)]
        json: bool,
    },
}

/// Where `group reset` moves the offsets (exactly one).
#[derive(Clone, Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct ResetTarget {
    /// To the log start: everything still stored is delivered again.
    #[arg(long)]
    to_earliest: bool,
    /// To the high-water mark: nothing stored now is delivered.
    #[arg(long)]
    to_latest: bool,
    /// To this offset (brought within the partition's stored offsets).
    #[arg(long, value_name = "OFFSET")]
    to_offset: Option<u64>,
    /// To the first message at or after this time (as for `replay --since`).
    #[arg(long, value_name = "TIME")]
    to_time: Option<String>,
}

/// Flags of `tandem read`.
#[derive(Clone, Debug, clap::Args)]
pub struct ReadArgs {
    /// Topic to read.
    pub topic: String,
    /// Only this partition (default: every partition, each read from the
    /// same offset or time, at most --limit messages from each).
    #[arg(long)]
    pub partition: Option<u32>,
    /// First offset (default: the log start).
    #[arg(long, conflicts_with_all = ["since", "id"])]
    pub offset: Option<u64>,
    /// From the first message at or after this time: ms since the epoch, a
    /// span ago (`15m`) or an RFC 3339 time.
    #[arg(long, value_name = "TIME", conflicts_with = "id")]
    pub since: Option<String>,
    /// The message with this id, in any partition.
    #[arg(long)]
    pub id: Option<String>,
    /// At most this many messages from each partition (1 to 1000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Prints one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Transactional messages.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum TxnCommand {
    /// Lists the transactions the coordinator remembers, oldest first, with
    /// their state, age, check-backs and when the next is due.
    List {
        /// Only this state: prepared, committed or rolled-back.
        #[arg(long)]
        state: Option<String>,
        /// Only this producer service's.
        #[arg(long)]
        service: Option<String>,
        /// At most this many (1 to 10000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Prints one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Shows one transaction.
    Show {
        /// The transaction's id.
        id: String,
        /// Prints one JSON document.
        #[arg(long)]
        json: bool,
    },
}

/// Dead-letter topics (`<topic>.dlq`).
#[derive(Clone, Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// Shows the dead letters of a topic: the message, which group gave it
    /// up, after how many attempts, and the last error.
    Show {
        /// The topic whose dead letters to show (not its `.dlq`).
        topic: String,
        /// Which dead letters.
        #[command(flatten)]
        range: DlqRange,
        /// Prints one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Publishes dead letters to their topic again, for the group that gave
    /// each up only (its sidecars handle it; the sidecars of the topic's
    /// other groups acknowledge it unhandled). Each dead letter is redriven
    /// with an id of its own, the same every time, so running it twice
    /// within the publish dedup window appends nothing more, and later a
    /// group with a dedup table skips the repeat. Dead letters without the
    /// headers a sidecar writes are listed and left alone.
    Redrive {
        /// The topic whose dead letters to redrive.
        topic: String,
        /// Which dead letters.
        #[command(flatten)]
        range: DlqRange,
        /// Prints one JSON document.
        #[arg(long)]
        json: bool,
    },
}

/// Which dead letters.
#[derive(Clone, Debug, clap::Args)]
pub struct DlqRange {
    /// Only this partition of the dead-letter topic (default: all).
    #[arg(long)]
    partition: Option<u32>,
    /// From this offset of the dead-letter topic's partitions.
    #[arg(long, default_value_t = 0)]
    offset: u64,
    /// Only those this group gave up.
    #[arg(long)]
    group: Option<String>,
    /// At most this many (1 to 1000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
}

fn headers_json(headers: &[pb::Header]) -> Value {
    headers
        .iter()
        .map(|h| json!({"name": h.name, "value": bytes_json(&h.value)}))
        .collect()
}

fn message_json(m: &pb::StoredMessage) -> Value {
    let msg = m.message.clone().unwrap_or_default();
    json!({
        "id": msg.id,
        "partition": m.partition,
        "offset": m.offset,
        "timestamp_ms": m.timestamp_ms,
        "key": msg.key.as_deref().map(bytes_json),
        "value": bytes_json(&msg.value),
        "headers": headers_json(&msg.headers),
    })
}

/// Bytes on one line of a table: UTF-8 with control characters escaped,
/// or base64.
fn bytes_text(b: &[u8]) -> String {
    match bytes_json(b) {
        Value::String(s) => s.escape_debug().to_string(),
        other => other.to_string(),
    }
}

fn print_message(out: &mut impl Write, m: &pb::StoredMessage) -> std::io::Result<()> {
    let msg = m.message.clone().unwrap_or_default();
    write!(
        out,
        "{}/{} {} id={}",
        m.partition,
        m.offset,
        format_ms(m.timestamp_ms),
        msg.id
    )?;
    if let Some(k) = &msg.key {
        write!(out, " key={}", bytes_text(k))?;
    }
    for h in &msg.headers {
        write!(out, " {}={}", h.name, bytes_text(&h.value))?;
    }
    writeln!(out, "\n  {}", bytes_text(&msg.value))
}

/// A transaction state as the commands print it.
pub(crate) fn state_name(s: i32) -> &'static str {
    match pb::TransactionState::try_from(s) {
        Ok(pb::TransactionState::Prepared) => "prepared",
        Ok(pb::TransactionState::Committed) => "committed",
        Ok(pb::TransactionState::RolledBack) => "rolled-back",
        _ => "unknown",
    }
}

fn txn_json(t: &pb::Transaction, now: i64) -> Value {
    json!({
        "txn_id": t.txn_id,
        "service": t.service,
        "instance": t.instance,
        "topic": t.topic,
        "state": state_name(t.state),
        "prepared_at_ms": t.prepared_at_ms,
        "age_ms": now.saturating_sub(t.prepared_at_ms),
        "checks": t.checks,
        "next_check_at_ms": (t.next_check_at_ms != 0).then_some(t.next_check_at_ms),
        "finished_at_ms": (t.finished_at_ms != 0).then_some(t.finished_at_ms),
        "resolved_by_check": t.resolved_by_check,
        "partition": t.position.as_ref().map(|p| p.partition),
        "offset": t.position.as_ref().map(|p| p.offset),
    })
}

fn seconds(ms: i64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

fn print_txn(out: &mut impl Write, t: &pb::Transaction, now: i64) -> std::io::Result<()> {
    let next = match t.next_check_at_ms {
        0 => "-".to_owned(),
        at if at <= now => "now".to_owned(),
        at => format!("in {}", seconds(at - now)),
    };
    let position = t
        .position
        .as_ref()
        .map_or("-".to_owned(), |p| format!("{}/{}", p.partition, p.offset));
    writeln!(
        out,
        "{:<38} {:<12} {:<16} {:<16} {:>9} {:>6} {:>10} {}",
        t.txn_id,
        state_name(t.state),
        t.service,
        t.topic,
        seconds(now.saturating_sub(t.prepared_at_ms)),
        t.checks,
        next,
        position
    )
}

/// Runs a `tandem group` command.
pub async fn group(url: &str, cmd: GroupCommand, out: &mut impl Write) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    match cmd {
        GroupCommand::List { topic, json } => list_groups(&mut c, topic, json, out).await,
        GroupCommand::Reset {
            group,
            topic,
            to,
            partitions,
            json,
        } => {
            use pb::reset_offsets_request::To;
            let to = if to.to_earliest {
                To::Earliest(true)
            } else if to.to_latest {
                To::Latest(true)
            } else if let Some(o) = to.to_offset {
                To::Offset(o)
            } else if let Some(t) = to.to_time {
                To::TimestampMs(parse_time(&t, now_ms())?)
            } else {
                anyhow::bail!("give one of --to-earliest, --to-latest, --to-offset, --to-time");
            };
            let r = Reset {
                topic,
                group,
                partitions,
                to,
                only_back: false,
            };
            reset(&mut c, r, json, out).await
        }
        GroupCommand::Replay {
            group,
            topic,
            since,
            partitions,
            json,
        } => {
            let to = pb::reset_offsets_request::To::TimestampMs(parse_time(&since, now_ms())?);
            let r = Reset {
                topic,
                group,
                partitions,
                to,
                only_back: true,
            };
            reset(&mut c, r, json, out).await
        }
    }
}

async fn list_groups(
    c: &mut CoordinatorClient<Channel>,
    topic: Option<String>,
    as_json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let topics = match topic {
        Some(t) => vec![t],
        None => c
            .list_topics(pb::ListTopicsRequest {})
            .await
            .map_err(status)?
            .into_inner()
            .topics
            .into_iter()
            .map(|t| t.name)
            .collect(),
    };
    let mut rows = Vec::new();
    for name in topics {
        let d = c
            .describe_topic(pb::DescribeTopicRequest { name: name.clone() })
            .await
            .map_err(status)?
            .into_inner();
        for g in d.groups {
            rows.push((name.clone(), g));
        }
    }
    if as_json {
        let groups: Vec<Value> = rows
            .iter()
            .map(|(topic, g)| {
                json!({
                    "topic": topic,
                    "group": g.group,
                    "total_lag": g.total_lag,
                    "partitions": g.partitions.iter().map(|p| json!({
                        "partition": p.partition,
                        "committed_offset": p.committed_offset,
                        "lag": p.lag,
                    })).collect::<Vec<_>>(),
                    "members": g.member_info.iter().map(|m| json!({
                        "id": m.id,
                        "credit": m.credit,
                        "partitions": m.partitions,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        writeln!(out, "{}", json!({ "groups": groups }))?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<24} {:<24} {:>7} {:>10}  member [partitions held]",
        "group", "topic", "members", "lag"
    )?;
    for (topic, g) in &rows {
        let members: Vec<String> = g
            .member_info
            .iter()
            .map(|m| format!("{} {:?}", m.id, m.partitions))
            .collect();
        writeln!(
            out,
            "{:<24} {:<24} {:>7} {:>10}  {}",
            g.group,
            topic,
            g.members,
            g.total_lag,
            members.join(", ")
        )?;
    }
    Ok(())
}

/// Where `group reset|replay` moves a group, and how.
struct Reset {
    topic: String,
    group: String,
    partitions: Vec<u32>,
    to: pb::reset_offsets_request::To,
    /// A replay: offsets only move back.
    only_back: bool,
}

async fn reset(
    c: &mut CoordinatorClient<Channel>,
    r: Reset,
    as_json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let asked = match r.to {
        pb::reset_offsets_request::To::Offset(o) => Some(o),
        _ => None,
    };
    let moves = c
        .reset_offsets(pb::ResetOffsetsRequest {
            topic: r.topic.clone(),
            group: r.group.clone(),
            partitions: r.partitions,
            to: Some(r.to),
            only_back: r.only_back,
        })
        .await
        .map_err(status)?
        .into_inner()
        .moves;
    let (topic, group) = (r.topic, r.group);
    if as_json {
        let moves: Vec<Value> = moves
            .iter()
            .map(|m| {
                json!({"partition": m.partition, "from": m.from, "to": m.to, "had_offset": m.had_offset})
            })
            .collect();
        writeln!(
            out,
            "{}",
            json!({"topic": topic, "group": group, "moves": moves})
        )?;
        return Ok(());
    }
    writeln!(out, "group {group} on topic {topic}:")?;
    for m in &moves {
        let mut notes = Vec::new();
        if !m.had_offset {
            notes.push("the group had no committed offset here".to_owned());
        }
        if let Some(o) = asked
            && o != m.to
        {
            notes.push(format!("{o} brought within the stored offsets"));
        }
        if r.only_back && m.had_offset && m.from == m.to {
            notes.push("already before that time: kept".to_owned());
        }
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!("  ({})", notes.join("; "))
        };
        writeln!(
            out,
            "{:>9} {:>12} -> {:<12}{notes}",
            m.partition, m.from, m.to
        )?;
    }
    Ok(())
}

/// Runs `tandem read`.
pub async fn read(url: &str, args: ReadArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    if let Some(id) = args.id {
        let m = c
            .find_message(pb::FindMessageRequest {
                topic: args.topic,
                id,
            })
            .await
            .map_err(status)?
            .into_inner();
        if args.json {
            writeln!(out, "{}", message_json(&m))?;
        } else {
            print_message(out, &m)?;
        }
        return Ok(());
    }
    let from = match (args.offset, args.since) {
        (_, Some(t)) => pb::read_messages_request::From::TimestampMs(parse_time(&t, now_ms())?),
        (o, None) => pb::read_messages_request::From::Offset(o.unwrap_or(0)),
    };
    let partitions: Vec<u32> = match args.partition {
        Some(p) => vec![p],
        None => c
            .describe_topic(pb::DescribeTopicRequest {
                name: args.topic.clone(),
            })
            .await
            .map_err(status)?
            .into_inner()
            .partitions
            .iter()
            .map(|p| p.partition)
            .collect(),
    };
    let mut read = Vec::new();
    for partition in partitions {
        let r = c
            .read_messages(pb::ReadMessagesRequest {
                topic: args.topic.clone(),
                partition,
                from: Some(from),
                limit: args.limit,
            })
            .await
            .map_err(status)?
            .into_inner();
        read.push((partition, r));
    }
    if args.json {
        let messages: Vec<Value> = read
            .iter()
            .flat_map(|(_, r)| r.messages.iter().map(message_json))
            .collect();
        let held: Vec<Value> = read
            .iter()
            .map(|(p, r)| {
                json!({"partition": p, "log_start": r.log_start, "high_water_mark": r.high_water_mark})
            })
            .collect();
        writeln!(out, "{}", json!({"messages": messages, "partitions": held}))?;
        return Ok(());
    }
    for (partition, r) in &read {
        for m in &r.messages {
            print_message(out, m)?;
        }
        let held = if r.high_water_mark > r.log_start {
            format!("offsets {} to {}", r.log_start, r.high_water_mark - 1)
        } else {
            format!("nothing (next offset {})", r.high_water_mark)
        };
        writeln!(
            out,
            "(partition {partition}: {} messages shown; it holds {held})",
            r.messages.len()
        )?;
    }
    Ok(())
}

/// Runs a `tandem txn` command.
pub async fn txn(url: &str, cmd: TxnCommand, out: &mut impl Write) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    let now = now_ms();
    let header = |out: &mut dyn Write| {
        writeln!(
            out,
            "{:<38} {:<12} {:<16} {:<16} {:>9} {:>6} {:>10} position",
            "transaction", "state", "service", "topic", "age", "checks", "next check"
        )
    };
    match cmd {
        TxnCommand::List {
            state,
            service,
            limit,
            json,
        } => {
            let state = match state.as_deref() {
                None => pb::TransactionState::Unspecified,
                Some("prepared") => pb::TransactionState::Prepared,
                Some("committed") => pb::TransactionState::Committed,
                Some("rolled-back") => pb::TransactionState::RolledBack,
                Some(other) => anyhow::bail!(
                    "--state: {other:?} is not a state (prepared, committed or rolled-back)"
                ),
            };
            let r = c
                .list_transactions(pb::ListTransactionsRequest {
                    state: state as i32,
                    service: service.unwrap_or_default(),
                    limit,
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            if json {
                let list: Vec<Value> = r.transactions.iter().map(|t| txn_json(t, now)).collect();
                writeln!(
                    out,
                    "{}",
                    json!({"transactions": list, "matched": r.matched})
                )?;
                return Ok(());
            }
            header(out)?;
            for t in &r.transactions {
                print_txn(out, t, now)?;
            }
            if r.matched > r.transactions.len() as u64 {
                writeln!(
                    out,
                    "({} of {} shown; raise --limit for more)",
                    r.transactions.len(),
                    r.matched
                )?;
            }
        }
        TxnCommand::Show { id, json } => {
            let t = c
                .get_transaction(pb::GetTransactionRequest { txn_id: id })
                .await
                .map_err(status)?
                .into_inner();
            if json {
                writeln!(out, "{}", txn_json(&t, now))?;
                return Ok(());
            }
            header(out)?;
            print_txn(out, &t, now)?;
            writeln!(
                out,
                "prepared at {} by {} ({}){}",
                format_ms(t.prepared_at_ms),
                t.service,
                if t.instance.is_empty() {
                    "instance unknown"
                } else {
                    &t.instance
                },
                if t.finished_at_ms == 0 {
                    String::new()
                } else {
                    format!(
                        "; decided at {}{}",
                        format_ms(t.finished_at_ms),
                        if t.resolved_by_check {
                            " by a check-back"
                        } else {
                            ""
                        }
                    )
                }
            )?;
        }
    }
    Ok(())
}

/// The headers a sidecar adds to a dead letter.
const DEAD_LETTER_HEADERS: [&str; 7] = [
    "tandem.error",
    "tandem.topic",
    "tandem.group",
    "tandem.partition",
    "tandem.offset",
    "tandem.attempts",
    "tandem.id",
];
/// Where a redriven message came from (`<topic>.dlq/PARTITION/OFFSET`).
const REDRIVE_FROM_HEADER: &str = "tandem.redrive.from";

/// A dead letter read from `<topic>.dlq`.
struct DeadLetter {
    stored: pb::StoredMessage,
    headers: BTreeMap<String, Bytes>,
}

impl DeadLetter {
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    }

    fn json(&self) -> Value {
        let msg = self.stored.message.clone().unwrap_or_default();
        let own: Vec<pb::Header> = msg
            .headers
            .iter()
            .filter(|h| !DEAD_LETTER_HEADERS.contains(&h.name.as_str()))
            .cloned()
            .collect();
        json!({
            "dlq_partition": self.stored.partition,
            "dlq_offset": self.stored.offset,
            "timestamp_ms": self.stored.timestamp_ms,
            "id": self.header("tandem.id"),
            "group": self.header("tandem.group"),
            "topic": self.header("tandem.topic"),
            "partition": self.header("tandem.partition").parse::<u32>().ok(),
            "offset": self.header("tandem.offset").parse::<u64>().ok(),
            "attempts": self.header("tandem.attempts").parse::<u32>().ok(),
            "error": self.header("tandem.error"),
            "key": msg.key.as_deref().map(bytes_json),
            "value": bytes_json(&msg.value),
            "headers": headers_json(&own),
        })
    }

    /// Why it cannot be redriven to `topic`, if it cannot: a dead letter a
    /// sidecar wrote names its group, topic and original id.
    fn unredrivable(&self, topic: &str) -> Option<String> {
        for name in ["tandem.group", "tandem.id"] {
            if self.header(name).is_empty() {
                return Some(format!("it has no {name} header"));
            }
        }
        let from = self.header("tandem.topic");
        (from != topic).then(|| format!("it came from topic {from:?}, not {topic:?}"))
    }

    /// The message to publish again: the original's key, value and
    /// headers, for the group that gave it up, under an id derived from
    /// the dead letter's place.
    fn redrive(&self, topic: &str, dlq: &str) -> pb::Message {
        let msg = self.stored.message.clone().unwrap_or_default();
        let mut headers: Vec<pb::Header> = msg
            .headers
            .into_iter()
            .filter(|h| {
                !DEAD_LETTER_HEADERS.contains(&h.name.as_str())
                    && h.name != tandem_sidecar::REDRIVE_GROUP_HEADER
                    && h.name != tandem_sidecar::REDRIVE_TOPIC_HEADER
                    && h.name != REDRIVE_FROM_HEADER
            })
            .collect();
        let from = format!("{dlq}/{}/{}", self.stored.partition, self.stored.offset);
        headers.push(pb::Header {
            name: tandem_sidecar::REDRIVE_GROUP_HEADER.to_owned(),
            value: Bytes::from(self.header("tandem.group")),
        });
        headers.push(pb::Header {
            name: tandem_sidecar::REDRIVE_TOPIC_HEADER.to_owned(),
            value: Bytes::from(topic.to_owned()),
        });
        headers.push(pb::Header {
            name: REDRIVE_FROM_HEADER.to_owned(),
            value: Bytes::from(from),
        });
        pb::Message {
            id: redrive_id(
                &self.header("tandem.id"),
                self.stored.partition,
                self.stored.offset,
            ),
            key: msg.key,
            value: msg.value,
            headers,
            partition: None,
        }
    }
}

/// The id of a redrive of the dead letter at `partition`/`offset` of the
/// message `id`: `ID~rP.O` when that fits in an id, else a fingerprint.
fn redrive_id(id: &str, partition: u32, offset: u64) -> String {
    let readable = format!("{id}~r{partition}.{offset}");
    if readable.len() <= tandem_coordinator::MAX_ID_LEN {
        return readable;
    }
    // FNV-1a, 64 bits: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("redrive-{h:016x}~r{partition}.{offset}")
}

/// Dead letters of `topic` within `range`, oldest first per partition.
async fn dead_letters(
    c: &mut CoordinatorClient<Channel>,
    dlq: &str,
    range: &DlqRange,
) -> anyhow::Result<Vec<DeadLetter>> {
    if range.limit == 0 || range.limit > 1000 {
        anyhow::bail!("--limit: must be between 1 and 1000");
    }
    let partitions: Vec<u32> = match range.partition {
        Some(p) => vec![p],
        None => {
            let d = c
                .describe_topic(pb::DescribeTopicRequest {
                    name: dlq.to_owned(),
                })
                .await
                .map_err(status)?
                .into_inner();
            d.partitions.iter().map(|p| p.partition).collect()
        }
    };
    let mut found = Vec::new();
    'partitions: for partition in partitions {
        let mut next = range.offset;
        loop {
            let r = c
                .read_messages(pb::ReadMessagesRequest {
                    topic: dlq.to_owned(),
                    partition,
                    from: Some(pb::read_messages_request::From::Offset(next)),
                    limit: 1000,
                })
                .await
                .map_err(status)?
                .into_inner();
            let Some(last) = r.messages.last().map(|m| m.offset) else {
                break;
            };
            next = last + 1;
            for stored in r.messages {
                let headers = stored
                    .message
                    .as_ref()
                    .map(|m| {
                        m.headers
                            .iter()
                            .map(|h| (h.name.clone(), h.value.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                let letter = DeadLetter { stored, headers };
                if range
                    .group
                    .as_ref()
                    .is_some_and(|g| *g != letter.header("tandem.group"))
                {
                    continue;
                }
                found.push(letter);
                if found.len() >= range.limit as usize {
                    break 'partitions;
                }
            }
        }
    }
    Ok(found)
}

/// Runs a `tandem dlq` command.
pub async fn dlq(url: &str, cmd: DlqCommand, out: &mut impl Write) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    match cmd {
        DlqCommand::Show { topic, range, json } => {
            let letters = dead_letters(&mut c, &format!("{topic}.dlq"), &range).await?;
            if json {
                let list: Vec<Value> = letters.iter().map(DeadLetter::json).collect();
                writeln!(out, "{}", json!({ "dead_letters": list }))?;
                return Ok(());
            }
            for l in &letters {
                writeln!(
                    out,
                    "{}/{} {} id={} group={} from {}/{} after {} attempts: {}",
                    l.stored.partition,
                    l.stored.offset,
                    format_ms(l.stored.timestamp_ms),
                    l.header("tandem.id"),
                    l.header("tandem.group"),
                    l.header("tandem.partition"),
                    l.header("tandem.offset"),
                    l.header("tandem.attempts"),
                    l.header("tandem.error").escape_debug(),
                )?;
                let value = l.stored.message.as_ref().map(|m| m.value.clone());
                writeln!(out, "  {}", bytes_text(&value.unwrap_or_default()))?;
            }
            writeln!(out, "({} dead letters)", letters.len())?;
        }
        DlqCommand::Redrive { topic, range, json } => {
            let dlq = format!("{topic}.dlq");
            let (letters, skipped): (Vec<DeadLetter>, Vec<DeadLetter>) =
                dead_letters(&mut c, &dlq, &range)
                    .await?
                    .into_iter()
                    .partition(|l| l.unredrivable(&topic).is_none());
            let mut redriven = Vec::new();
            for chunk in letters.chunks(100) {
                let positions = c
                    .publish(pb::PublishRequest {
                        topic: topic.clone(),
                        messages: chunk.iter().map(|l| l.redrive(&topic, &dlq)).collect(),
                    })
                    .await
                    .map_err(status)
                    .map_err(|e| {
                        e.context(format!("redrive stopped after {} messages", redriven.len()))
                    })?
                    .into_inner()
                    .positions;
                redriven.extend(chunk.iter().zip(positions));
            }
            if json {
                let list: Vec<Value> = redriven
                    .iter()
                    .map(|(l, p)| {
                        json!({
                            "dlq_partition": l.stored.partition,
                            "dlq_offset": l.stored.offset,
                            "group": l.header("tandem.group"),
                            "id": p.id,
                            "partition": p.partition,
                            "offset": p.offset,
                        })
                    })
                    .collect();
                let skipped: Vec<Value> = skipped
                    .iter()
                    .map(|l| {
                        json!({
                            "dlq_partition": l.stored.partition,
                            "dlq_offset": l.stored.offset,
                            "reason": l.unredrivable(&topic),
                        })
                    })
                    .collect();
                writeln!(out, "{}", json!({ "redriven": list, "skipped": skipped }))?;
                return Ok(());
            }
            for l in &skipped {
                writeln!(
                    out,
                    "{dlq} {}/{} not redriven: {}",
                    l.stored.partition,
                    l.stored.offset,
                    l.unredrivable(&topic).unwrap_or_default()
                )?;
            }
            for (l, p) in &redriven {
                writeln!(
                    out,
                    "{dlq} {}/{} -> {topic} {}/{} id={} for group {}",
                    l.stored.partition,
                    l.stored.offset,
                    p.partition,
                    p.offset,
                    p.id,
                    l.header("tandem.group")
                )?;
            }
            writeln!(out, "({} redriven)", redriven.len())?;
        }
    }
    Ok(())
}
