//! What a log holds: records with an id, an optional key, a value and
//! headers, and the names of the partitions that hold them.

use std::fmt;

use bytes::Bytes;

use crate::error::{Error, Result};

/// One header of a record: a name and an opaque value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Header name (UTF-8).
    pub name: String,
    /// Header value.
    pub value: Bytes,
}

/// One record as appended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Stable message id (for transactional messages, the transaction id).
    pub id: Bytes,
    /// Partitioning key, if any.
    pub key: Option<Bytes>,
    /// The payload.
    pub value: Bytes,
    /// Application headers (trace context, error details, ...).
    pub headers: Vec<Header>,
    /// Producer time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
}

impl Record {
    /// Bytes the record takes in a batch on disk; what `max_record_bytes`
    /// limits.
    pub fn encoded_len(&self) -> usize {
        crate::batch::record_len(self)
    }
}

/// A record read back, with the offset the log gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// Offset within the partition.
    pub offset: u64,
    /// The record.
    pub record: Record,
}

/// Names one partition of one topic.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: String,
    /// Partition number, from 0.
    pub partition: u32,
}

impl TopicPartition {
    /// A partition name; the topic is checked when the partition is created.
    pub fn new(topic: impl Into<String>, partition: u32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Longest topic name accepted (Kafka's limit, so names carry over).
pub const MAX_TOPIC_NAME_LEN: usize = 249;

/// Checks a topic name: 1 to 249 characters of `[A-Za-z0-9._-]`, and not
/// `.` or `..` (names are folder names on disk).
pub fn validate_topic_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > MAX_TOPIC_NAME_LEN {
        Some("longer than 249 characters")
    } else if name == "." || name == ".." {
        Some("must not be . or ..")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("only ASCII letters, digits, '.', '_' and '-' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidTopicName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_are_checked() {
        for good in ["orders", "orders.dlq", "__txn_state", "a-b_c.d", "x"] {
            assert!(validate_topic_name(good).is_ok(), "{good}");
        }
        let long = "a".repeat(250);
        for bad in ["", ".", "..", "a/b", "a b", "é", long.as_str()] {
            assert!(
                matches!(
                    validate_topic_name(bad),
                    Err(Error::InvalidTopicName { .. })
                ),
                "{bad}"
            );
        }
    }
}
