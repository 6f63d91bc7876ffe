//! The producer's duplicate window: message ids a publisher chose, per topic,
//! remembered for `publish_dedup_window_ms` after their append.
//!
//! A `Publish` retried after a lost acknowledgement carries the same ids: the
//! retry is answered with the positions of the first append and appends
//! nothing. The same id with other content (key, value, headers) is
//! `ALREADY_EXISTS`, and the whole request changes nothing. Two requests with
//! one id in flight at once are serialised: the second waits for the first's
//! outcome. Ids the coordinator generates (none sent) are not remembered; a
//! producer that wants its retries deduplicated sends its own ids.
//!
//! The window survives restarts: at start-up it is rebuilt from the tail of
//! every partition (records younger than the window), from the records
//! whose id their publisher chose ([`CHOSEN_ID_HEADER`]): the same ids as
//! it held before, not the ids the coordinator generated nor transactions'
//! messages. Transaction ids and
//! published ids do not mix: a publish reusing the id of a transaction the
//! coordinator remembers, or a prepare reusing an id published within the
//! window, is `ALREADY_EXISTS` (the consumers' dedup would otherwise swallow
//! one of the two).

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tandem_storage::{Log, ReadBudget, Record, TopicPartition};
use tokio::sync::watch;

use crate::broker::Position;
use crate::error::{Error, Result};
use crate::statelog::now_ms;
use crate::transactions::MARKER_HEADER;

/// The header a published record carries when its publisher chose its id
/// (empty value): what tells the window's rebuild which ids to hold.
/// Reserved: a publish may not set it, and deliveries do not show it.
pub(crate) const CHOSEN_ID_HEADER: &str = "tandem.dedup";

/// Bytes the [`CHOSEN_ID_HEADER`] adds to a stored record.
pub(crate) const CHOSEN_ID_BYTES: usize = 6 + CHOSEN_ID_HEADER.len();

/// Marks a record whose id its publisher chose.
pub(crate) fn mark_chosen(record: &mut Record) {
    record.headers.push(tandem_storage::Header {
        name: CHOSEN_ID_HEADER.to_owned(),
        value: Bytes::new(),
    });
}

/// Whether `record` was published under an id its publisher chose.
fn chosen(record: &Record) -> bool {
    record.headers.iter().any(|h| h.name == CHOSEN_ID_HEADER)
        && !record.headers.iter().any(|h| h.name == MARKER_HEADER)
}

/// Fingerprint of what a message says (its id, partition and timestamp are
/// not content; the transaction marker header is Tandem's, not the app's;
/// the trace context says where it was sent from).
pub(crate) fn content_digest(r: &Record) -> u64 {
    let key = r.key.as_deref();
    let mut parts: Vec<&[u8]> = vec![if key.is_some() { b"k" } else { b"-" }];
    parts.push(key.unwrap_or_default());
    parts.push(&r.value);
    for h in r.headers.iter().filter(|h| {
        h.name != MARKER_HEADER
            && h.name != CHOSEN_ID_HEADER
            && !crate::txn_core::is_trace_header(&h.name)
    }) {
        parts.push(h.name.as_bytes());
        parts.push(&h.value);
    }
    crate::wire::fingerprint(&parts, 0x85eb_ca6b)
}

#[derive(Clone, Copy, Debug)]
enum Seen {
    /// Being appended by another request.
    InFlight { digest: u64 },
    /// Appended at `at_ms`.
    Done {
        digest: u64,
        position: Position,
        at_ms: i64,
    },
}

#[derive(Debug, Default)]
struct TopicIds {
    by_id: HashMap<Bytes, Seen>,
    /// Appended ids, oldest first, for expiry.
    order: VecDeque<(i64, Bytes)>,
}

impl TopicIds {
    fn expire(&mut self, cutoff: i64) {
        while let Some((at, _)) = self.order.front() {
            if *at >= cutoff {
                break;
            }
            let (at, id) = self.order.pop_front().expect("front exists");
            if let Some(Seen::Done { at_ms, .. }) = self.by_id.get(&id)
                && *at_ms == at
            {
                self.by_id.remove(&id);
            }
        }
    }

    fn done(&mut self, id: Bytes, digest: u64, position: Position, at_ms: i64) {
        self.by_id.insert(
            id.clone(),
            Seen::Done {
                digest,
                position,
                at_ms,
            },
        );
        self.order.push_back((at_ms, id));
    }
}

/// What to do with one request's messages.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Append the messages at these indexes (the others repeat an earlier
    /// append, or an earlier message of this request); `known` holds the
    /// answer for every index already settled.
    Append {
        fresh: Vec<usize>,
        known: Vec<Option<Position>>,
        /// For each index, the earlier index of this request it repeats.
        same_as: Vec<Option<usize>>,
        reservation: Reservation,
    },
    /// Every message repeats an earlier append.
    Repeat(Vec<Position>),
}

/// Ids this request marked in flight; [`Reservation::finish`] settles
/// them, and dropping it unsettled forgets them (waiters then retry).
#[derive(Debug)]
pub(crate) struct Reservation {
    recent: Arc<Recent>,
    topic: String,
    ids: Vec<(Bytes, u64)>,
}

impl Reservation {
    /// Settles the ids with the positions they got; ids without one are
    /// forgotten (their append failed: a retry appends them).
    pub(crate) fn finish(mut self, positions: &HashMap<Bytes, Position>) {
        let ids = std::mem::take(&mut self.ids);
        self.recent.settle(&self.topic, ids, Some(positions));
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let ids = std::mem::take(&mut self.ids);
        self.recent.settle(&self.topic, ids, None);
    }
}

/// Recent publisher-chosen ids of every topic.
#[derive(Debug)]
pub(crate) struct Recent {
    window: Duration,
    topics: Mutex<HashMap<String, TopicIds>>,
    settled: watch::Sender<u64>,
}

impl Recent {
    pub(crate) fn new(window: Duration) -> Recent {
        Recent {
            window,
            topics: Mutex::default(),
            settled: watch::channel(0).0,
        }
    }

    fn cutoff(&self) -> i64 {
        now_ms().saturating_sub(i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX))
    }

    /// Rebuilds the window from the tail of every partition of `topics`.
    pub(crate) async fn rebuild<L: Log>(&self, log: &L, topics: &[(String, u32)]) -> Result<()> {
        if self.window.is_zero() {
            return Ok(());
        }
        let cutoff = self.cutoff();
        let mut found = 0usize;
        for (topic, partitions) in topics {
            let mut ids = TopicIds::default();
            let mut recent: Vec<(i64, Bytes, u64, Position)> = Vec::new();
            for p in 0..*partitions {
                let tp = TopicPartition::new(topic, p);
                let offsets = log.offsets(&tp)?;
                let from = tail_start(log, &tp, offsets.log_start, offsets.high_water_mark, cutoff)
                    .await?;
                let mut at = from;
                while at < offsets.high_water_mark {
                    let batch = log.read(&tp, at, ReadBudget::default()).await?;
                    let Some(last) = batch.last() else { break };
                    at = last.offset + 1;
                    for s in batch {
                        if s.record.timestamp_ms >= cutoff && chosen(&s.record) {
                            recent.push((
                                s.record.timestamp_ms,
                                // (a copy: kept for the whole window, a
                                // slice would keep the read buffer alive)
                                bytes::Bytes::copy_from_slice(&s.record.id),
                                content_digest(&s.record),
                                Position {
                                    partition: p,
                                    offset: s.offset,
                                },
                            ));
                        }
                    }
                }
            }
            recent.sort_by_key(|r| r.0);
            found += recent.len();
            for (at, id, digest, position) in recent {
                if !ids.by_id.contains_key(&id) {
                    ids.done(id, digest, position, at);
                }
            }
            if !ids.by_id.is_empty() {
                self.lock().insert(topic.clone(), ids);
            }
        }
        if found > 0 {
            tracing::info!(
                ids = found,
                window_ms = self.window.as_millis() as u64,
                "publish dedup window rebuilt"
            );
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TopicIds>> {
        self.topics.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides which of `records` to append; waits while one of their ids is
    /// being appended by another request. `chosen[i]` is true when the
    /// publisher chose record `i`'s id (only those are deduplicated).
    pub(crate) async fn plan(
        self: &Arc<Self>,
        topic: &str,
        records: &[impl Borrow<Record>],
        chosen: &[bool],
    ) -> Result<Plan> {
        // Only ids the publisher chose are compared (0 stands for the rest).
        let digests: Vec<u64> = records
            .iter()
            .zip(chosen)
            .map(|(r, &c)| {
                if c && !self.window.is_zero() {
                    content_digest(r.borrow())
                } else {
                    0
                }
            })
            .collect();
        loop {
            let mut settled = self.settled.subscribe();
            let wait = {
                let mut topics = self.lock();
                let ids = topics.entry(topic.to_owned()).or_default();
                ids.expire(self.cutoff());
                match self.check(ids, records, chosen, &digests) {
                    Err(e) => return Err(e),
                    Ok(None) => true,
                    Ok(Some((fresh, known, same_as))) => {
                        if fresh.is_empty() {
                            let all = known
                                .iter()
                                .zip(&same_as)
                                .map(|(k, s)| k.or_else(|| s.and_then(|j| known[j])))
                                .collect::<Option<Vec<_>>>()
                                .expect("every message repeats a settled one");
                            return Ok(Plan::Repeat(all));
                        }
                        let mut reservation = Reservation {
                            recent: self.clone(),
                            topic: topic.to_owned(),
                            ids: Vec::new(),
                        };
                        for &i in &fresh {
                            if chosen[i] && !self.window.is_zero() {
                                let id = records[i].borrow().id.clone();
                                ids.by_id
                                    .insert(id.clone(), Seen::InFlight { digest: digests[i] });
                                reservation.ids.push((id, digests[i]));
                            }
                        }
                        return Ok(Plan::Append {
                            fresh,
                            known,
                            same_as,
                            reservation,
                        });
                    }
                }
            };
            if wait {
                // Another request is appending one of these ids: its outcome
                // decides ours.
                let _ = settled.changed().await;
            }
        }
    }

    /// `Ok(None)`: an id is in flight elsewhere, wait.
    #[allow(clippy::type_complexity)]
    fn check(
        &self,
        ids: &TopicIds,
        records: &[impl Borrow<Record>],
        chosen: &[bool],
        digests: &[u64],
    ) -> Result<Option<(Vec<usize>, Vec<Option<Position>>, Vec<Option<usize>>)>> {
        let mut fresh = Vec::new();
        let mut known = vec![None; records.len()];
        let mut same_as = vec![None; records.len()];
        let mut first: HashMap<&Bytes, usize> = HashMap::new();
        for (i, r) in records.iter().enumerate() {
            let r = r.borrow();
            if !chosen[i] || self.window.is_zero() {
                fresh.push(i);
                continue;
            }
            let conflict = || Error::DuplicateId {
                field: format!("messages[{i}].id"),
                id: String::from_utf8_lossy(&r.id).into_owned(),
                window_ms: self.window.as_millis() as u64,
            };
            if let Some(&j) = first.get(&r.id) {
                if digests[j] != digests[i] {
                    return Err(conflict());
                }
                same_as[i] = Some(j);
                continue;
            }
            first.insert(&r.id, i);
            match ids.by_id.get(&r.id) {
                None => fresh.push(i),
                Some(Seen::InFlight { digest }) => {
                    if *digest != digests[i] {
                        return Err(conflict());
                    }
                    return Ok(None);
                }
                Some(Seen::Done {
                    digest, position, ..
                }) => {
                    if *digest != digests[i] {
                        return Err(conflict());
                    }
                    known[i] = Some(*position);
                }
            }
        }
        Ok(Some((fresh, known, same_as)))
    }

    fn settle(
        &self,
        topic: &str,
        reserved: Vec<(Bytes, u64)>,
        positions: Option<&HashMap<Bytes, Position>>,
    ) {
        if reserved.is_empty() {
            return;
        }
        {
            let mut topics = self.lock();
            let ids = topics.entry(topic.to_owned()).or_default();
            let now = now_ms();
            for (id, digest) in reserved {
                match positions.and_then(|p| p.get(&id)) {
                    Some(&position) => ids.done(id, digest, position, now),
                    None => {
                        ids.by_id.remove(&id);
                    }
                }
            }
        }
        self.settled.send_modify(|n| *n += 1);
    }

    /// Holds `id` on `topic` while a transaction with that id is prepared,
    /// so that a plain publish of the same id meanwhile is refused (it sees
    /// the id in flight with other content) and a prepare of an id
    /// published within the window is refused: `Err` names the conflict.
    /// `None` when the window is off.
    pub(crate) fn hold_for_prepare(
        self: &Arc<Self>,
        topic: &str,
        id: &str,
    ) -> Result<Option<Reservation>> {
        if self.window.is_zero() {
            return Ok(None);
        }
        let mut topics = self.lock();
        let ids = topics.entry(topic.to_owned()).or_default();
        ids.expire(self.cutoff());
        let key = bytes::Bytes::copy_from_slice(id.as_bytes());
        if let Some(Seen::InFlight { digest: u64::MAX }) = ids.by_id.get(&key) {
            // held by another prepare of the same id: the transaction
            // table decides between the two
            return Ok(None);
        }
        if ids.by_id.contains_key(&key) {
            return Err(Error::IdConflict {
                id: id.to_owned(),
                what: "a plain message published to its topic under that id within publish_dedup_window_ms",
            });
        }
        // A digest no message has: a publish of this id meanwhile conflicts.
        ids.by_id
            .insert(key.clone(), Seen::InFlight { digest: u64::MAX });
        Ok(Some(Reservation {
            recent: self.clone(),
            topic: topic.to_owned(),
            ids: vec![(key, u64::MAX)],
        }))
    }

    /// Forgets the ids of a deleted topic.
    pub(crate) fn forget_topic(&self, topic: &str) {
        self.lock().remove(topic);
    }

    /// Where `id` was appended to `topic`, if it is remembered now.
    pub(crate) fn position_of(&self, topic: &str, id: &str) -> Option<Position> {
        let cutoff = self.cutoff();
        match self.lock().get(topic)?.by_id.get(id.as_bytes())? {
            Seen::Done {
                position, at_ms, ..
            } if *at_ms >= cutoff => Some(*position),
            _ => None,
        }
    }

    /// Ids remembered now, over all topics.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().values().map(|t| t.by_id.len()).sum()
    }
}

/// The first offset to scan so that every record at or after `cutoff` is
/// read: steps back from the end, doubling, until a record older than the
/// cutoff (timestamps are the coordinator's clock, near-monotonic per
/// partition) or the log start.
async fn tail_start<L: Log>(
    log: &L,
    tp: &TopicPartition,
    start: u64,
    end: u64,
    cutoff: i64,
) -> Result<u64> {
    let mut step = 1024u64;
    let mut from = end;
    while from > start {
        from = end.saturating_sub(step).max(start);
        let first = log
            .read(
                tp,
                from,
                ReadBudget {
                    max_bytes: 1,
                    max_records: 1,
                },
            )
            .await?;
        if first
            .first()
            .is_some_and(|s| s.record.timestamp_ms < cutoff)
        {
            break;
        }
        step = step.saturating_mul(2);
    }
    Ok(from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, value: &str) -> Record {
        Record {
            id: Bytes::from(id.to_owned()),
            key: None,
            value: Bytes::from(value.to_owned()),
            headers: Vec::new(),
            timestamp_ms: now_ms(),
        }
    }

    fn pos(offset: u64) -> Position {
        Position {
            partition: 0,
            offset,
        }
    }

    #[tokio::test]
    async fn a_retry_repeats_the_first_answer_and_other_content_is_refused() {
        let r = Arc::new(Recent::new(Duration::from_secs(60)));
        let batch = [record("a", "1"), record("b", "2")];
        let Plan::Append {
            fresh, reservation, ..
        } = r.plan("t", &batch, &[true, true]).await.expect("planned")
        else {
            panic!("first publish appends");
        };
        assert_eq!(fresh, vec![0, 1]);
        let got: HashMap<Bytes, Position> =
            [(batch[0].id.clone(), pos(7)), (batch[1].id.clone(), pos(8))]
                .into_iter()
                .collect();
        reservation.finish(&got);
        match r.plan("t", &batch, &[true, true]).await.expect("planned") {
            Plan::Repeat(p) => assert_eq!(p, vec![pos(7), pos(8)]),
            other => panic!("a retry appends nothing: {other:?}"),
        }
        let e = r
            .plan(
                "t",
                &[record("c", "3"), record("b", "other")],
                &[true, true],
            )
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("messages[1].id"), "{e}");
        // the refused request reserved nothing: "c" is still new
        assert_eq!(r.len(), 2);
    }

    #[tokio::test]
    async fn a_failed_append_is_forgotten_and_waiters_retry() {
        let r = Arc::new(Recent::new(Duration::from_secs(60)));
        let batch = [record("a", "1")];
        let Plan::Append { reservation, .. } = r.plan("t", &batch, &[true]).await.expect("planned")
        else {
            panic!("appends");
        };
        let r2 = r.clone();
        let waiter = tokio::spawn(async move {
            matches!(
                r2.plan("t", &[record("a", "1")], &[true])
                    .await
                    .expect("planned"),
                Plan::Append { .. }
            )
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "the second waits for the first");
        drop(reservation); // the append failed or was abandoned
        assert!(
            waiter.await.expect("waiter ran"),
            "after a failure the retry appends"
        );
    }

    #[tokio::test]
    async fn ids_the_coordinator_generated_and_a_zero_window_are_not_kept() {
        let r = Arc::new(Recent::new(Duration::from_secs(60)));
        // A generated id beside a chosen one, in one request.
        let batch = [record("g", "1"), record("a", "1")];
        let Plan::Append {
            fresh, reservation, ..
        } = r.plan("t", &batch, &[false, true]).await.expect("planned")
        else {
            panic!("appends");
        };
        assert_eq!(fresh, vec![0, 1]);
        assert_eq!(r.len(), 1, "only the chosen id is held");
        reservation.finish(
            &[(Bytes::from("g"), pos(0)), (Bytes::from("a"), pos(1))]
                .into_iter()
                .collect(),
        );
        assert_eq!(r.len(), 1, "only the chosen id is kept");
        // Sent again: the generated id is a new message, the chosen one a
        // repeat of its first append.
        let Plan::Append { fresh, known, .. } =
            r.plan("t", &batch, &[false, true]).await.expect("planned")
        else {
            panic!("the generated id is appended again");
        };
        assert_eq!(fresh, vec![0]);
        assert_eq!(known, vec![None, Some(pos(1))]);
        let off = Arc::new(Recent::new(Duration::ZERO));
        let Plan::Append { fresh, .. } = off
            .plan("t", &[record("a", "1"), record("a", "2")], &[true, true])
            .await
            .expect("planned")
        else {
            panic!("appends");
        };
        assert_eq!(fresh, vec![0, 1]);
    }

    #[tokio::test]
    async fn a_prepare_and_a_publish_of_one_id_exclude_each_other() {
        let r = Arc::new(Recent::new(Duration::from_secs(60)));
        let held = r
            .hold_for_prepare("t", "x")
            .expect("free")
            .expect("window on");
        assert!(
            r.hold_for_prepare("t", "x").expect("same id").is_none(),
            "a second prepare of the id is left to the transaction table"
        );
        r.plan("t", &[record("x", "1")], &[true])
            .await
            .expect_err("the id is being prepared");
        drop(held);
        let Plan::Append { reservation, .. } = r
            .plan("t", &[record("x", "1")], &[true])
            .await
            .expect("free again")
        else {
            panic!("appends");
        };
        reservation.finish(&[(Bytes::from("x"), pos(0))].into_iter().collect());
        r.hold_for_prepare("t", "x")
            .expect_err("published within the window");
    }
}
