//! The topic registry: names and partition counts, kept in the internal
//! `__topics` state log. A topic's partitions are created in the data log
//! first and the topic is recorded after, so a crash in between leaves
//! partitions of no topic (deleted when the broker opens, or by a retried
//! create), never a topic without them. A deletion records the topic's
//! tombstone first and deletes its partitions after.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock};

use tandem_storage::{Error as StorageError, Log, TopicPartition, validate_topic_name};

use crate::error::{Error, Result};
use crate::statelog::{StateLog, now_ms, upsert};

/// Most partitions a topic may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// What the registry knows of a topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopicMeta {
    /// Number of partitions.
    pub partitions: u32,
    /// When it was created (ms since the epoch).
    pub created_ms: i64,
}

impl TopicMeta {
    fn encode(&self) -> Vec<u8> {
        let mut v = self.partitions.to_le_bytes().to_vec();
        v.extend_from_slice(&self.created_ms.to_le_bytes());
        v
    }

    fn decode(b: &[u8]) -> Option<TopicMeta> {
        Some(TopicMeta {
            partitions: u32::from_le_bytes(b.get(..4)?.try_into().ok()?),
            created_ms: i64::from_le_bytes(b.get(4..12)?.try_into().ok()?),
        })
    }
}

/// The topic registry.
pub(crate) struct Topics<L> {
    data: L,
    map: RwLock<BTreeMap<String, TopicMeta>>,
    state: tokio::sync::Mutex<StateLog<L>>,
}

/// Checks a user-chosen topic name.
pub(crate) fn check_name(field: &str, name: &str) -> Result<()> {
    validate_topic_name(name).map_err(|e| Error::invalid(field, e.to_string()))?;
    if name.starts_with("__") {
        return Err(Error::invalid(
            field,
            "names starting with \"__\" are reserved for Tandem",
        ));
    }
    Ok(())
}

impl<L: Log + Clone> Topics<L> {
    /// Loads the registry from `internal`; topics live in `data`.
    pub(crate) async fn open(data: L, internal: L) -> Result<Self> {
        let (state, records) = StateLog::open(internal, "__topics", 10_000).await?;
        let mut map = BTreeMap::new();
        for r in records {
            let name =
                String::from_utf8_lossy(r.record.key.as_deref().unwrap_or_default()).into_owned();
            match TopicMeta::decode(&r.record.value) {
                Some(meta) => {
                    map.insert(name, meta);
                }
                None => {
                    map.remove(&name);
                }
            }
        }
        Ok(Topics {
            data,
            map: RwLock::new(map),
            state: tokio::sync::Mutex::new(state),
        })
    }

    /// The topic's metadata, if it exists.
    pub(crate) fn get(&self, name: &str) -> Option<TopicMeta> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .copied()
    }

    /// The topic's metadata, or NOT_FOUND naming it.
    pub(crate) fn require(&self, name: &str) -> Result<TopicMeta> {
        self.get(name).ok_or_else(|| Error::NotFound {
            what: "topic",
            name: name.to_owned(),
        })
    }

    /// Every topic, by name.
    pub(crate) fn list(&self) -> Vec<(String, TopicMeta)> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Creates partitions `range` of `name` in the data log, empty: one
    /// that exists already belongs to no topic (a creation or growth cut
    /// short) and is deleted first, so nothing of it is adopted.
    async fn create_partitions(&self, name: &str, range: std::ops::Range<u32>) -> Result<()> {
        for p in range {
            let tp = TopicPartition::new(name, p);
            match self.data.create_partition(&tp).await {
                Ok(()) => {}
                Err(StorageError::PartitionExists(_)) => {
                    self.data.delete_partition(&tp).await?;
                    self.data.create_partition(&tp).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Creates a topic; ALREADY_EXISTS if the name is taken.
    pub(crate) async fn create(&self, name: &str, partitions: u32) -> Result<TopicMeta> {
        check_name("name", name)?;
        self.create_unchecked(name, partitions).await
    }

    /// Creates a topic whose name Tandem chose itself (`<topic>.dlq`, ...).
    pub(crate) async fn create_unchecked(&self, name: &str, partitions: u32) -> Result<TopicMeta> {
        if !(1..=MAX_PARTITIONS).contains(&partitions) {
            return Err(Error::invalid(
                "partitions",
                format!("must be between 1 and {MAX_PARTITIONS}, got {partitions}"),
            ));
        }
        let state = self.state.lock().await;
        if self.get(name).is_some() {
            return Err(Error::AlreadyExists {
                what: "topic",
                name: name.to_owned(),
            });
        }
        self.create_partitions(name, 0..partitions).await?;
        let meta = TopicMeta {
            partitions,
            created_ms: now_ms(),
        };
        state
            .append(vec![upsert(name.as_bytes().to_vec(), meta.encode())])
            .await?;
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), meta);
        tracing::info!(topic = name, partitions, "topic created");
        Ok(meta)
    }

    /// Gives topic `name` `partitions` partitions in all (more than it
    /// has); returns the count before. New partitions start empty; a key
    /// may map to another partition from now on.
    pub(crate) async fn add_partitions(&self, name: &str, partitions: u32) -> Result<u32> {
        if name.starts_with("__") {
            return Err(Error::invalid(
                "name",
                "Tandem's own topics keep their partition count",
            ));
        }
        let state = self.state.lock().await;
        let meta = self.require(name)?;
        if partitions <= meta.partitions || partitions > MAX_PARTITIONS {
            return Err(Error::invalid(
                "partitions",
                format!(
                    "must be more than the topic's {} (partitions are added, never removed) and at most {MAX_PARTITIONS}, got {partitions}",
                    meta.partitions
                ),
            ));
        }
        self.create_partitions(name, meta.partitions..partitions)
            .await?;
        let grown = TopicMeta { partitions, ..meta };
        state
            .append(vec![upsert(name.as_bytes().to_vec(), grown.encode())])
            .await?;
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), grown);
        tracing::info!(
            topic = name,
            from = meta.partitions,
            to = partitions,
            "partitions added"
        );
        Ok(meta.partitions)
    }

    /// Forgets topic `name` (its tombstone written first); returns what it
    /// was. Its partitions are the caller's to delete.
    pub(crate) async fn delete(&self, name: &str) -> Result<TopicMeta> {
        let state = self.state.lock().await;
        let meta = self.require(name)?;
        state
            .append(vec![upsert(name.as_bytes().to_vec(), Vec::new())])
            .await?;
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        tracing::info!(topic = name, partitions = meta.partitions, "topic deleted");
        Ok(meta)
    }
}
