//! The broker: topics, publishing and consumer groups over a [`Log`]. This
//! is the coordinator without its gRPC skin; the service in `service.rs`
//! maps requests onto it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;

use futures_util::future::join_all;
use tandem_storage::{Log, Offsets as LogOffsets, Record, TopicPartition};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::claims::Claims;
use crate::config::TxnSettings;
use crate::consumer::Groups;
use crate::error::{Error, Result};
use crate::offsets::Offsets;
use crate::partitioner::{self, Sticky};
use crate::published::{Plan, Recent};
use crate::session::Sessions;
use crate::topics::{TopicMeta, Topics};
use crate::transactions::Transactions;

/// A message ready to append: its record and, if the publisher chose one,
/// its partition.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// Explicit partition (checked against the topic by the caller).
    pub partition: Option<u32>,
    /// The record to store.
    pub record: Record,
    /// The publisher chose the id (only such ids are deduplicated).
    pub chosen_id: bool,
}

/// A checked half message and who prepares it.
#[derive(Debug)]
pub struct HalfMessage<'a> {
    /// The producer service: only its sidecars decide the outcome.
    pub service: &'a str,
    /// The sidecar instance preparing it (check-backs go there first).
    pub instance: &'a str,
    /// The transaction id, also the message's id.
    pub txn_id: &'a str,
    /// Its topic.
    pub topic: &'a str,
    /// The message.
    pub message: Outgoing,
    /// Opaque to the coordinator; handed back with every check-back.
    pub context: Bytes,
    /// Names the caller's call (`PrepareRequest.attempt`).
    pub attempt: &'a str,
}

/// Where an appended message now lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// Partition.
    pub partition: u32,
    /// Offset within it.
    pub offset: u64,
}

/// One partition of a topic description.
#[derive(Clone, Debug)]
pub struct PartitionDescription {
    /// Partition number.
    pub partition: u32,
    /// Its offsets.
    pub offsets: LogOffsets,
}

/// A consumer group's position on a topic.
#[derive(Clone, Debug)]
pub struct GroupDescription {
    /// Group name.
    pub group: String,
    /// Committed offset per partition (absent: nothing committed yet).
    pub committed: BTreeMap<u32, u64>,
    /// Live members.
    pub members: Vec<MemberDescription>,
}

/// A live member of a consumer group.
#[derive(Clone, Debug)]
pub struct MemberDescription {
    /// Member id.
    pub id: String,
    /// Deliveries it may still be sent before it grants more.
    pub credit: u64,
    /// Partitions it holds, not counting ones being revoked.
    pub partitions: Vec<u32>,
}

/// Topics, publishing and consumer groups.
pub struct Broker<L> {
    pub(crate) data: L,
    pub(crate) topics: Topics<L>,
    pub(crate) offsets: Arc<Offsets>,
    pub(crate) groups: Arc<Groups<L>>,
    pub(crate) txns: Arc<Transactions<L>>,
    /// In the broker of the shard holding `__sagas` only.
    pub(crate) sagas: Option<crate::saga::Sagas>,
    pub(crate) recent: Arc<Recent>,
    shard: u32,
    claims: Option<Arc<Claims>>,
    /// Held (shared) by every publish and prepare, and (alone) by a topic's
    /// deletion: no append to a topic is under way while it is deleted.
    pub(crate) appending: tokio::sync::RwLock<()>,
    sticky: Sticky,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Where a broker stands among the shards its replica serves, and what it
/// shares with them.
pub(crate) struct Place {
    /// Its shard.
    pub(crate) shard: u32,
    /// The replica's sidecar sessions (check-backs and branch calls of
    /// every shard go down them).
    pub(crate) sessions: Arc<Sessions>,
    /// Whether it holds the sagas (the shard of `__sagas`).
    pub(crate) sagas: bool,
    /// Transaction ids across shards (several shards only).
    pub(crate) claims: Option<Arc<Claims>>,
}

/// A broker's time limits.
#[derive(Clone)]
pub(crate) struct Limits {
    pub(crate) revoke_timeout: Duration,
    pub(crate) dedup_window: Duration,
    pub(crate) offsets_retention: Duration,
    pub(crate) saga_retention: Duration,
}

impl<L: Log + Clone> Broker<L> {
    /// Opens the broker: topics in `data`, its own state in `internal`;
    /// starts check-backs and the transaction log's upkeep.
    pub(crate) async fn open(
        data: L,
        internal: L,
        limits: Limits,
        txn: TxnSettings,
        place: Place,
    ) -> Result<Broker<L>> {
        let Limits {
            revoke_timeout,
            dedup_window,
            offsets_retention,
            saga_retention,
        } = limits;
        let topics = Topics::open(data.clone(), internal.clone()).await?;
        // Partitions of no topic: a deletion (or a creation) a crash cut
        // short. Their data goes.
        for tp in data.partitions() {
            if topics.get(&tp.topic).is_none() {
                tracing::warn!(partition = %tp, "deleting the partition of a topic that does not exist");
                data.delete_partition(&tp).await?;
            }
        }
        let recent = Arc::new(Recent::new(dedup_window));
        let known: Vec<(String, u32)> = topics
            .list()
            .into_iter()
            .map(|(name, meta)| (name, meta.partitions))
            .collect();
        recent.rebuild(&data, &known).await?;
        let offsets = Offsets::open(internal.clone()).await?;
        // Offsets on topics that do not exist: a deletion a crash cut
        // short (a topic created again with the name must start afresh).
        let stale: Vec<String> = offsets
            .topics()
            .into_iter()
            .filter(|t| topics.get(t).is_none())
            .collect();
        for t in &stale {
            tracing::warn!(topic = %t, "forgetting offsets on a topic that does not exist");
            offsets.forget_topic(t);
        }
        if !stale.is_empty() {
            offsets.flush().await?;
        }
        let schedule = txn.maintenance_schedule.clone();
        let txn_retention = txn.retention;
        let txns =
            Transactions::open(data.clone(), internal.clone(), txn, place.sessions.clone()).await?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let sagas = if place.sagas {
            if topics.get(crate::saga::SAGA_TOPIC).is_none() {
                topics.create_unchecked(crate::saga::SAGA_TOPIC, 1).await?;
            }
            let (sagas, driver) = crate::saga::Sagas::open(
                data.clone(),
                internal,
                place.sessions.clone(),
                saga_retention,
                shutdown_rx.clone(),
            )
            .await?;
            tasks.push(driver);
            Some(sagas)
        } else {
            None
        };
        let groups = Arc::new(Groups::new(
            data.clone(),
            offsets.clone(),
            revoke_timeout,
            shutdown_rx,
        ));
        let checks = tokio::spawn(txns.clone().run_checks());
        let (t, o, g) = (txns.clone(), offsets.clone(), groups.clone());
        let seen = Arc::new(LastSeen {
            started_ms: crate::statelog::now_ms(),
            live: Mutex::default(),
        });
        let (shard, claims) = (place.shard, place.claims.clone());
        let upkeep = tokio::spawn(schedule.run(move || {
            let (t, o, g, seen) = (t.clone(), o.clone(), g.clone(), seen.clone());
            let claims = claims.clone();
            async move {
                if let Err(e) = t.maintain().await {
                    tracing::error!(error = %e, "transaction log upkeep failed");
                }
                if let Some(c) = claims {
                    // Claims outlive their transactions by a retention:
                    // an id is only forgotten once its shard forgot it.
                    match c.sweep(shard, txn_retention, |id| t.knows(id)).await {
                        Ok(n) if n > 0 => tracing::debug!(shard, forgotten = n, "transaction id claims forgotten"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(shard, error = %e, "could not forget old transaction id claims"),
                    }
                }
                if !offsets_retention.is_zero() {
                    expire_offsets(&o, &g, &seen, offsets_retention).await;
                }
            }
        }));
        Ok(Broker {
            data,
            topics,
            offsets,
            groups,
            txns,
            sagas,
            recent,
            shard: place.shard,
            claims: place.claims,
            appending: tokio::sync::RwLock::new(()),
            sticky: Sticky::default(),
            shutdown,
            tasks: Mutex::new({
                tasks.extend([checks, upkeep]);
                tasks
            }),
        })
    }

    /// Stores a half message (see `Transactions::prepare`); returns when
    /// it was first prepared.
    pub async fn prepare(
        &self,
        half: HalfMessage<'_>,
        meta: TopicMeta,
    ) -> Result<crate::transactions::Prepared> {
        let _appending = self.appending.read().await;
        self.topics.require(half.topic)?; // not deleted meanwhile
        // A transaction's id must not be a plain message's id in its topic:
        // held while preparing, so a concurrent publish of it is refused.
        let _held = if self.txns.knows(half.txn_id) {
            None // a retry of a transaction
        } else {
            // Held first: an id refused here (a plain message's) leaves no
            // claim behind.
            let held = self.recent.hold_for_prepare(half.topic, half.txn_id)?;
            if let Some(claims) = &self.claims {
                let holder = claims.claim(half.txn_id, self.shard).await?;
                if holder != self.shard {
                    return Err(Error::IdConflict {
                        id: half.txn_id.to_owned(),
                        what: "a message for a topic of another shard",
                    });
                }
            }
            held
        };
        let partition = partition_for(&half.message, meta, self.sticky.next(meta.partitions));
        self.txns.prepare(half, partition).await
    }

    /// Creates a topic.
    pub async fn create_topic(&self, name: &str, partitions: u32) -> Result<TopicMeta> {
        // Not while a topic is deleted or grown (one of the same name).
        let _alone = self.appending.write().await;
        self.topics.create(name, partitions).await
    }

    /// Every topic, by name.
    pub fn list_topics(&self) -> Vec<(String, TopicMeta)> {
        self.topics.list()
    }

    /// A topic's metadata, or NOT_FOUND.
    pub fn topic(&self, name: &str) -> Result<TopicMeta> {
        self.topics.require(name)
    }

    /// Partitions and group positions of a topic.
    pub async fn describe(
        &self,
        name: &str,
    ) -> Result<(Vec<PartitionDescription>, Vec<GroupDescription>)> {
        let meta = self.topics.require(name)?;
        let partitions = (0..meta.partitions)
            .map(|p| {
                Ok(PartitionDescription {
                    partition: p,
                    offsets: self.data.offsets(&TopicPartition::new(name, p))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut members = self.groups.members_of(name).await;
        let mut groups: Vec<GroupDescription> = self
            .offsets
            .for_topic(name)
            .into_iter()
            .map(|(group, committed)| GroupDescription {
                members: members.remove(&group).unwrap_or_default(),
                group,
                committed,
            })
            .collect();
        groups.extend(
            members
                .into_iter()
                .map(|(group, members)| GroupDescription {
                    group,
                    committed: BTreeMap::new(),
                    members,
                }),
        );
        groups.sort_by(|a, b| a.group.cmp(&b.group));
        Ok((partitions, groups))
    }

    /// Appends checked messages to `topic`; returns their positions in
    /// order, once all are acknowledged by the log. Messages for one
    /// partition are appended as one batch, in request order. A message
    /// whose publisher-chosen id was appended within the dedup window (a
    /// retry) is not appended again: its first position is returned.
    pub async fn publish(
        &self,
        topic: &str,
        meta: TopicMeta,
        messages: Vec<Outgoing>,
    ) -> Result<Vec<Position>> {
        let _appending = self.appending.read().await;
        self.topics.require(topic)?; // not deleted meanwhile
        let (fresh, known, same_as, reservation) = {
            let records: Vec<&Record> = messages.iter().map(|m| &m.record).collect();
            let chosen: Vec<bool> = messages.iter().map(|m| m.chosen_id).collect();
            match self.recent.plan(topic, &records, &chosen).await? {
                Plan::Repeat(positions) => return Ok(positions),
                Plan::Append {
                    fresh,
                    known,
                    same_as,
                    reservation,
                } => (fresh, known, same_as, reservation),
            }
        };
        // Checked while the ids are held: a transaction prepared with one of
        // them meanwhile is seen here (its prepare held the id until done).
        for &i in &fresh {
            let m = &messages[i];
            if m.chosen_id && self.txns.knows(&String::from_utf8_lossy(&m.record.id)) {
                return Err(crate::Error::TransactionId {
                    field: format!("messages[{i}].id"),
                    id: String::from_utf8_lossy(&m.record.id).into_owned(),
                });
            }
        }
        // The publisher-chosen ids among them (only those are remembered),
        // each with its index in the batch appended.
        let ids: Vec<(usize, Bytes)> = fresh
            .iter()
            .enumerate()
            .filter(|&(_, &i)| messages[i].chosen_id)
            .map(|(k, &i)| (k, messages[i].record.id.clone()))
            .collect();
        let batch: Vec<Outgoing> = {
            let mut messages: Vec<Option<Outgoing>> = messages.into_iter().map(Some).collect();
            fresh
                .iter()
                .map(|&i| {
                    let mut m = messages[i].take().expect("fresh indexes are distinct");
                    if m.chosen_id {
                        crate::published::mark_chosen(&mut m.record);
                    }
                    m
                })
                .collect()
        };
        // The append runs to its end even if the caller goes away, so that
        // the reservation is settled with what really happened.
        let sticky = self.sticky.next(meta.partitions);
        let data = self.data.clone();
        let owned_topic = topic.to_owned();
        let appended = tokio::spawn(async move {
            // Per partition: the ids of partitions whose append succeeded are
            // remembered even when another partition's failed, so a retry
            // cannot append them a second time.
            let (positions, failure) = append(&data, &owned_topic, meta, batch, sticky).await;
            reservation.finish(
                &ids.into_iter()
                    .filter_map(|(k, id)| Some((id, positions[k]?)))
                    .collect(),
            );
            match failure {
                Some(e) => Err(e),
                None => Ok(positions.into_iter().flatten().collect::<Vec<_>>()),
            }
        })
        .await
        .map_err(|e| crate::Error::Internal(format!("append task failed: {e}")))??;
        let mut out = known;
        for (k, &i) in fresh.iter().enumerate() {
            out[i] = Some(appended[k]);
        }
        for i in 0..out.len() {
            if out[i].is_none() {
                out[i] = same_as[i].and_then(|j| out[j]);
            }
        }
        Ok(out
            .into_iter()
            .map(|p| p.expect("every message has a position"))
            .collect())
    }

    /// Ends every consumer session (each commits what was acknowledged) and
    /// flushes committed offsets.
    pub async fn shutdown(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for t in tasks {
            t.abort();
        }
        self.shutdown.send_replace(true);
        self.groups.sessions_ended(Duration::from_secs(10)).await;
        self.txns.quiesce(Duration::from_secs(10)).await;
        self.offsets.close().await;
    }
}

/// Appends `messages` (each to its partition); their positions in order.
async fn append<L: Log>(
    data: &L,
    topic: &str,
    meta: TopicMeta,
    messages: Vec<Outgoing>,
    sticky: u32,
) -> (Vec<Option<Position>>, Option<crate::Error>) {
    let mut by_partition: BTreeMap<u32, (Vec<usize>, Vec<Record>)> = BTreeMap::new();
    let total = messages.len();
    for (i, m) in messages.into_iter().enumerate() {
        let p = partition_for(&m, meta, sticky);
        let entry = by_partition.entry(p).or_default();
        entry.0.push(i);
        entry.1.push(m.record);
    }
    let appends = by_partition
        .into_iter()
        .map(|(p, (idx, records))| async move {
            let ack = data.append(&TopicPartition::new(topic, p), records).await;
            (p, idx, ack)
        });
    let mut out = vec![None; total];
    let mut failure = None;
    for (p, idx, ack) in join_all(appends).await {
        match ack {
            Ok(ack) => {
                for (k, i) in idx.into_iter().enumerate() {
                    out[i] = Some(Position {
                        partition: p,
                        offset: ack.base_offset + k as u64,
                    });
                }
            }
            Err(e) => failure = Some(e.into()),
        }
    }
    (out, failure)
}

/// The partition a message goes to: its own choice, its key's, or the
/// request's sticky one.
fn partition_for(m: &Outgoing, meta: TopicMeta, sticky: u32) -> u32 {
    match (m.partition, &m.record.key) {
        (Some(p), _) => p,
        (None, Some(key)) => partitioner::for_key(key, meta.partitions),
        (None, None) => sticky,
    }
}

/// When each (group, topic) was last seen with a member, for the offsets
/// expiry: a group is "unused" only once it has been empty (and committed
/// nothing) for the whole retention, as Kafka counts since the group became
/// empty; after a restart every group counts as seen at start-up.
struct LastSeen {
    started_ms: i64,
    live: Mutex<std::collections::HashMap<(String, String), i64>>,
}

/// Forgets the committed offsets of groups that have had no member and no
/// commit for `retention` (see `Offsets::expire`).
async fn expire_offsets<L: Log + Clone>(
    offsets: &Offsets,
    groups: &Groups<L>,
    seen: &LastSeen,
    retention: Duration,
) {
    let now = crate::statelog::now_ms();
    let mut live_now = Vec::new();
    for topic in offsets.topics() {
        for (group, members) in groups.members_of(&topic).await {
            if !members.is_empty() {
                live_now.push((group, topic.clone()));
            }
        }
    }
    let before = now - retention.as_millis() as i64;
    let n = {
        let mut last = seen.live.lock().unwrap_or_else(PoisonError::into_inner);
        for k in live_now {
            last.insert(k, now);
        }
        let n = offsets.expire(before, |g, t| {
            seen.started_ms >= before
                || last
                    .get(&(g.to_owned(), t.to_owned()))
                    .is_some_and(|at| *at >= before)
        });
        last.retain(|_, at| *at >= before);
        n
    };
    if n > 0 {
        tracing::info!(
            partitions = n,
            retention_ms = retention.as_millis() as u64,
            "offsets of groups without members or commits forgotten"
        );
    }
}
