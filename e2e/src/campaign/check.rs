//! The history checker: what one campaign cycle recorded, and the promise
//! checked over it. Pure: the runner gathers the history (what the workload
//! sent and was told, the producer's committed local transactions, the
//! topic's records as stored on disk, the consumer's effects, the dead
//! letters) and this decides.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// How the consumer's handler was told to behave for a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handling {
    /// Handled at the first call.
    Plain,
    /// Fails transiently, then is handled: an effect is expected.
    Transient,
    /// Fails on every call with this status (a gRPC code that counts):
    /// dead-lettered, for that status.
    Poison(i32),
}

/// One message the workload sent through the producer's sidecar.
#[derive(Clone, Debug)]
pub struct Sent {
    /// Transaction id, also the message id.
    pub id: String,
    /// Its key.
    pub key: String,
    /// Its value.
    pub value: String,
    /// What the consumer's handler does with it.
    pub handling: Handling,
    /// Answers of every call made for it (`COMMITTED`, `ROLLED_BACK`,
    /// `PREPARED`, or an error status), in order.
    pub answers: Vec<String>,
}

/// A deliberate reuse of an id with other content.
#[derive(Clone, Debug)]
pub struct Conflict {
    /// The reused id.
    pub id: String,
    /// The other value sent under it.
    pub value: String,
    /// The answer: must be an error (`ALREADY_EXISTS`).
    pub answer: String,
}

/// A record of a topic, as stored.
#[derive(Clone, Debug)]
pub struct Logged {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Message id, prefixed with its topic unless on the main topic.
    pub id: String,
    /// Key, prefixed likewise.
    pub key: String,
    /// Value.
    pub value: String,
}

/// Everything one cycle recorded.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// What the workload sent.
    pub sent: Vec<Sent>,
    /// Deliberate conflicting reuses of ids.
    pub conflicts: Vec<Conflict>,
    /// Ids whose local transaction committed (the producer's business rows).
    pub local_committed: BTreeSet<String>,
    /// Transaction ids, once per start of ExecuteLocalTransaction.
    pub executions: Vec<String>,
    /// Ids of plain (non-transactional) messages in `sent`, published with
    /// their own id and retried: each is appended once at most, and once
    /// for sure if any call was answered `OK`.
    pub plain: BTreeSet<String>,
    /// The topic's records, as stored.
    pub log: Vec<Logged>,
    /// The consumer's effects, in the order they were committed: message id.
    pub effects: Vec<String>,
    /// Dead letters: original message id → the error recorded with it.
    pub dead_letters: Vec<(String, String)>,
    /// Each partition of the topics as stored: (topic, partition, log
    /// start, high-water mark); the records read must cover exactly that
    /// range.
    pub ranges: Vec<(String, u32, u64, u64)>,
    /// Set when the cluster did not settle (lag or open transactions left)
    /// within the bound after the faults stopped: what was left.
    pub stalled: Option<String>,
    /// Consumer members seen short of credit with nothing left to deliver
    /// during the cycle (after rebalance storms).
    pub credit_lost: Vec<String>,
    /// The consumer app was stopped past the handler timeout during the
    /// cycle: calls timed out meanwhile count as failed attempts, so a
    /// message that fails a few times on purpose may be dead-lettered.
    pub consumer_app_stalled: bool,
    /// The cycle consumed in SIDECAR mode.
    pub sidecar_mode: bool,
    /// Messages with a call whose outcome a consumer sidecar could not
    /// know: it gave up waiting (past its handler timeout), or the app died
    /// during the call.
    pub uncertain: BTreeSet<String>,
}

/// A broken promise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant.
    pub kind: &'static str,
    /// What exactly.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

/// Counts over one checked history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Messages sent.
    pub sent: usize,
    /// Local transactions that committed.
    pub committed: usize,
    /// Records in the topic.
    pub appended: usize,
    /// Effects.
    pub effects: usize,
    /// Dead letters.
    pub dead_lettered: usize,
    /// Conflicting reuses refused.
    pub conflicts_refused: usize,
}

/// Checks the promise over `h`: every committed local transaction's message
/// is appended once and takes effect once (or is dead-lettered, if its
/// handler always fails); no rolled-back one is ever appended; content and
/// per-key order are kept; offsets have no gaps; conflicting reuses are
/// refused and replace nothing; nothing stalls.
pub fn check(h: &History) -> (Tally, Vec<Violation>) {
    let mut v = Vec::new();
    let mut bad = |kind: &'static str, detail: String| v.push(Violation { kind, detail });
    let sent: BTreeMap<&str, &Sent> = h.sent.iter().map(|s| (s.id.as_str(), s)).collect();

    if let Some(what) = &h.stalled {
        bad("stalled", what.clone());
    }
    for what in &h.credit_lost {
        bad("credit lost", what.clone());
    }

    // The topic: no gaps, each id once, only committed ones, content kept.
    let mut by_partition: BTreeMap<(&str, u32), Vec<u64>> = BTreeMap::new();
    let mut logged: BTreeMap<&str, Vec<&Logged>> = BTreeMap::new();
    for r in &h.log {
        by_partition
            .entry((r.topic.as_str(), r.partition))
            .or_default()
            .push(r.offset);
        logged.entry(r.id.as_str()).or_default().push(r);
    }
    for ((t, p), offsets) in &by_partition {
        for w in offsets.windows(2) {
            if w[1] != w[0] + 1 {
                bad(
                    "offset gap",
                    format!("{t} partition {p}: {} then {}", w[0], w[1]),
                );
            }
        }
    }
    for (t, p, start, end) in &h.ranges {
        let (p, start, end) = (*p, *start, *end);
        let got = by_partition
            .get(&(t.as_str(), p))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let (first, last) = (got.first().copied(), got.last().copied());
        let want = (start < end).then(|| (start, end - 1));
        if first.zip(last) != want || got.len() as u64 != end.saturating_sub(start) {
            bad(
                "offset gap",
                format!(
                    "{t} partition {p}: stored {start}..{end}, read {} records from {first:?} to {last:?}",
                    got.len()
                ),
            );
        }
    }
    for (id, records) in &logged {
        if records.len() > 1 {
            bad(
                "appended twice",
                format!(
                    "{id} at {:?}",
                    records
                        .iter()
                        .map(|r| (r.topic.as_str(), r.partition, r.offset))
                        .collect::<Vec<_>>()
                ),
            );
        }
        if !h.local_committed.contains(*id) && !h.plain.contains(*id) {
            bad(
                "rolled back but appended",
                format!("{id} (its local transaction never committed)"),
            );
        }
        match sent.get(id) {
            Some(s) if s.value != records[0].value => bad(
                "content replaced",
                format!("{id}: sent {:?}, stored {:?}", s.value, records[0].value),
            ),
            Some(s) if s.key != records[0].key => bad(
                "key replaced",
                format!("{id}: sent {:?}, stored {:?}", s.key, records[0].key),
            ),
            Some(_) => {}
            None => bad("unknown message", format!("{id} was never sent")),
        }
    }
    // What the workload was told holds.
    for s in &h.sent {
        let appended = logged.contains_key(s.id.as_str());
        if h.plain.contains(&s.id) && s.answers.iter().any(|a| a == "OK") && !appended {
            bad(
                "told published, never appended",
                format!("{}: answers {:?}", s.id, s.answers),
            );
        }
        if s.answers.iter().any(|a| a == "COMMITTED") && !appended {
            bad(
                "told committed, never appended",
                format!("{}: answers {:?}", s.id, s.answers),
            );
        }
        if s.answers.iter().any(|a| a == "ROLLED_BACK") && appended {
            bad(
                "told rolled back, appended",
                format!("{}: answers {:?}", s.id, s.answers),
            );
        }
        if s.answers.iter().any(|a| a.starts_with("ALREADY_EXISTS")) {
            bad(
                "identical retry refused",
                format!("{}: answers {:?}", s.id, s.answers),
            );
        }
    }
    for id in &h.local_committed {
        if !logged.contains_key(id.as_str()) {
            bad(
                "lost",
                format!("{id}: its local transaction committed, its message was never appended"),
            );
        }
    }

    // Consumption: each appended message takes effect once, or is
    // dead-lettered when (and only when) its handler always fails.
    let mut effects: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &h.effects {
        *effects.entry(id.as_str()).or_default() += 1;
    }
    let mut dead: BTreeMap<&str, &str> = BTreeMap::new();
    for (id, e) in &h.dead_letters {
        if dead.contains_key(id.as_str()) {
            bad("dead-lettered twice", id.clone());
        } else {
            dead.insert(id.as_str(), e.as_str());
        }
    }
    for (id, n) in &effects {
        // SIDECAR mode's documented limits: a call the sidecar gave up on
        // (past the handler timeout), or during which the app died, may
        // have taken effect, and the retry takes effect again. STRONG mode
        // has no such limit.
        let excused = h.sidecar_mode && h.uncertain.contains(*id);
        if *n > 1 && !excused {
            bad("effect applied twice", format!("{id}: {n} effects"));
        }
        if !logged.contains_key(id) {
            bad("effect of a message not in the topic", (*id).to_owned());
        }
    }
    for id in logged.keys() {
        let poison_code = sent.get(id).and_then(|s| match s.handling {
            Handling::Poison(code) => Some(tonic::Code::from_i32(code)),
            _ => None,
        });
        let poison = poison_code.is_some();
        let effect = effects.contains_key(id);
        let dlq = dead.get(id);
        // The sidecar dead-letters a message whose calls the app died
        // during several times (the campaign kills the app, and some
        // handlers crash it): a cause, as long as it did not take effect.
        let crashed = dlq.is_some_and(|why| why.contains("connection broke"));
        match (poison, effect, dlq) {
            (false, true, None) => {}
            (false, false, Some(_)) if crashed || h.consumer_app_stalled => {}
            (false, false, None) => bad("never consumed", (*id).to_owned()),
            (false, _, Some(why)) => bad("dead-lettered without cause", format!("{id}: {why}")),
            (true, true, _) => bad("poison message took effect", (*id).to_owned()),
            // A poison message fails at once: its dead letter names the
            // status it failed with, or a last call that timed out (the app
            // stopped meanwhile), not some other cause.
            (true, false, Some(why)) => {
                let code = format!("{:?}", poison_code.unwrap_or(tonic::Code::Unknown));
                let timed_out = why.contains("did not answer within handler_timeout_ms");
                if !why.starts_with(&code) && !timed_out {
                    bad(
                        "poison message dead-lettered for another cause",
                        format!("{id} failed with {code}, dead letter says: {why}"),
                    );
                }
            }
            (true, false, None) => bad("poison message not dead-lettered", (*id).to_owned()),
        }
    }
    for (id, why) in &dead {
        if !logged.contains_key(id) {
            bad(
                "dead letter of a message not in the topic",
                format!("{id}: {why}"),
            );
        }
    }

    // Per-key order: the effects of one key follow the order of its records
    // in the partition.
    let position: BTreeMap<&str, (u32, u64)> = h
        .log
        .iter()
        .map(|r| (r.id.as_str(), (r.partition, r.offset)))
        .collect();
    let mut last_by_key: BTreeMap<&str, (&str, (u32, u64))> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for id in &h.effects {
        if !seen.insert(id.as_str()) {
            continue;
        }
        let (Some(&pos), Some(s)) = (position.get(id.as_str()), sent.get(id.as_str())) else {
            continue;
        };
        if let Some((prev, prev_pos)) = last_by_key.get(s.key.as_str())
            && *prev_pos > pos
        {
            bad(
                "per-key order broken",
                format!(
                    "key {}: {prev} (at {prev_pos:?}) took effect before {id} (at {pos:?})",
                    s.key
                ),
            );
        }
        last_by_key.insert(s.key.as_str(), (id.as_str(), pos));
    }

    // A transaction's local part runs once: a retried call learns the
    // outcome (or leaves it to check-back), it never runs it again.
    let mut runs: BTreeMap<&str, u32> = BTreeMap::new();
    for id in &h.executions {
        *runs.entry(id.as_str()).or_default() += 1;
    }
    for (id, n) in runs {
        if n > 1 {
            bad(
                "local transaction executed twice",
                format!("{id}: ExecuteLocalTransaction started {n} times"),
            );
        }
    }

    // Conflicting reuses: refused, and the first content is what is stored.
    let mut refused = 0;
    for c in &h.conflicts {
        if c.answer.starts_with("ALREADY_EXISTS") {
            refused += 1;
        } else if c.answer.contains(": ") {
            // another error ("CODE: message"): the request may never have
            // been heard (the sidecar down or cut off each time); what was
            // stored under the id is still checked below
        } else {
            bad(
                "conflicting reuse accepted",
                format!("{} with value {:?}: {}", c.id, c.value, c.answer),
            );
        }
        if logged
            .get(c.id.as_str())
            .is_some_and(|r| r.iter().any(|r| r.value == c.value))
        {
            bad(
                "id replaced",
                format!("{}: the conflicting value {:?} was stored", c.id, c.value),
            );
        }
    }

    let tally = Tally {
        sent: h.sent.len(),
        committed: h.local_committed.len(),
        appended: h.log.len(),
        effects: h.effects.len(),
        dead_lettered: h.dead_letters.len(),
        conflicts_refused: refused,
    };
    (tally, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(id: &str, key: &str, handling: Handling) -> Sent {
        Sent {
            id: id.into(),
            key: key.into(),
            value: format!("commit-{id}"),
            handling,
            answers: vec!["COMMITTED".into()],
        }
    }

    fn logged(id: &str, key: &str, partition: u32, offset: u64) -> Logged {
        Logged {
            topic: "t".into(),
            partition,
            offset,
            id: id.into(),
            key: key.into(),
            value: format!("commit-{id}"),
        }
    }

    /// a and b on key k (partition 0), c poison on key j (partition 1),
    /// r rolled back, x a refused conflicting reuse of a.
    fn good() -> History {
        History {
            sent: vec![
                sent("a", "k", Handling::Plain),
                sent("b", "k", Handling::Transient),
                sent("c", "j", Handling::Poison(2)),
                Sent {
                    value: "rollback-r".into(),
                    answers: vec!["ROLLED_BACK".into()],
                    ..sent("r", "k", Handling::Plain)
                },
            ],
            conflicts: vec![Conflict {
                id: "a".into(),
                value: "other".into(),
                answer: "ALREADY_EXISTS: exists".into(),
            }],
            local_committed: ["a", "b", "c"].into_iter().map(String::from).collect(),
            executions: ["a", "b", "c"].into_iter().map(String::from).collect(),
            plain: BTreeSet::new(),
            log: vec![
                logged("a", "k", 0, 0),
                logged("b", "k", 0, 1),
                logged("c", "j", 1, 0),
            ],
            effects: vec!["a".into(), "b".into()],
            dead_letters: vec![("c".into(), "Unknown: boom".into())],
            ranges: vec![
                ("t".into(), 0, 0, 2),
                ("t".into(), 1, 0, 1),
                ("t".into(), 2, 0, 0),
            ],
            stalled: None,
            credit_lost: Vec::new(),
            consumer_app_stalled: false,
            sidecar_mode: false,
            uncertain: BTreeSet::new(),
        }
    }

    fn kinds(h: &History) -> Vec<&'static str> {
        check(h).1.into_iter().map(|v| v.kind).collect()
    }

    #[test]
    fn a_kept_promise_passes() {
        let (tally, v) = check(&good());
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(
            (
                tally.appended,
                tally.effects,
                tally.dead_lettered,
                tally.conflicts_refused
            ),
            (3, 2, 1, 1)
        );
    }

    #[test]
    fn partitions_of_two_topics_are_apart() {
        let mut h = good();
        h.sent.push(sent("u/a", "u/k", Handling::Plain));
        h.plain.insert("u/a".into());
        h.log.push(Logged {
            topic: "u".into(),
            ..logged("u/a", "u/k", 0, 0)
        });
        h.ranges.push(("u".into(), 0, 0, 1));
        h.effects.push("u/a".into());
        assert!(kinds(&h).is_empty(), "{:?}", check(&h).1);
        h.ranges.last_mut().expect("pushed").3 = 2;
        assert_eq!(kinds(&h), vec!["offset gap"]);
    }

    #[test]
    fn every_broken_promise_is_named() {
        let mut h = good();
        h.local_committed.insert("r".into());
        assert_eq!(kinds(&h), vec!["lost"]);

        let mut h = good();
        h.credit_lost = vec!["after storm 1: group lag 0, m has credit 1 of 16".into()];
        assert_eq!(kinds(&h), vec!["credit lost"]);

        let mut h = good();
        h.log.push(logged("r", "k", 0, 2));
        h.ranges[0].3 = 3;
        h.sent[3].value = "commit-r".into();
        h.sent[3].answers = vec!["PREPARED".into()];
        h.effects.push("r".into());
        assert_eq!(kinds(&h), vec!["rolled back but appended"]);
        h.plain.insert("r".into());
        assert!(
            kinds(&h).is_empty(),
            "a plain message has no local transaction"
        );
        h.sent[3].answers = vec!["OK".into()];
        h.log.pop();
        h.ranges[0].3 = 2;
        h.effects.pop();
        assert_eq!(kinds(&h), vec!["told published, never appended"]);

        let mut h = good();
        h.effects.push("a".into());
        assert_eq!(kinds(&h), vec!["effect applied twice"]);

        let mut h = good();
        h.effects = vec!["b".into(), "a".into()];
        assert_eq!(kinds(&h), vec!["per-key order broken"]);

        let mut h = good();
        h.log[1].offset = 2;
        h.ranges[0].3 = 3;
        assert_eq!(kinds(&h), vec!["offset gap", "offset gap"]);

        let mut h = good();
        h.log.remove(1); // the tail of partition 0 was not read back
        h.effects.pop();
        assert!(kinds(&h).contains(&"offset gap"), "{:?}", kinds(&h));

        let mut h = good();
        h.sent[3].answers = vec!["COMMITTED".into()];
        assert_eq!(kinds(&h), vec!["told committed, never appended"]);

        let mut h = good();
        h.sent[0].answers.push("ROLLED_BACK".into());
        assert_eq!(kinds(&h), vec!["told rolled back, appended"]);

        let mut h = good();
        h.sent[0].answers.push("ALREADY_EXISTS: no".into());
        assert_eq!(kinds(&h), vec!["identical retry refused"]);

        let mut h = good();
        h.dead_letters.push(("c".into(), "again".into()));
        assert_eq!(kinds(&h), vec!["dead-lettered twice"]);

        let mut h = good();
        h.log.push(logged("a", "k", 0, 2));
        assert!(kinds(&h).contains(&"appended twice"));

        let mut h = good();
        h.effects.pop();
        assert_eq!(kinds(&h), vec!["never consumed"]);

        let mut h = good();
        h.dead_letters.push(("a".into(), "why".into()));
        assert_eq!(kinds(&h), vec!["dead-lettered without cause"]);

        let mut h = good();
        h.dead_letters.push((
            "b".into(),
            "the app's connection broke during 3 calls".into(),
        ));
        assert_eq!(
            kinds(&h),
            vec!["dead-lettered without cause"],
            "b took effect, yet was dead-lettered"
        );
        h.effects.pop();
        assert!(
            kinds(&h).is_empty(),
            "a crash-dead-lettered message without effect is fine"
        );

        let mut h = good();
        h.dead_letters.clear();
        assert_eq!(kinds(&h), vec!["poison message not dead-lettered"]);

        let mut h = good();
        h.effects.push("a".into());
        assert_eq!(kinds(&h), vec!["effect applied twice"]);
        h.uncertain.insert("a".into());
        assert_eq!(
            kinds(&h),
            vec!["effect applied twice"],
            "STRONG has no excuse"
        );
        h.sidecar_mode = true;
        assert!(kinds(&h).is_empty(), "SIDECAR's limit: a timed-out call");

        let mut h = good();
        h.executions.push("a".into());
        assert_eq!(kinds(&h), vec!["local transaction executed twice"]);

        // b fails twice on purpose; with calls timed out while the app was
        // stopped, it may run out of attempts
        let mut h = good();
        h.effects.retain(|id| id != "b");
        h.dead_letters
            .push(("b".into(), "InvalidArgument: fails".into()));
        assert_eq!(kinds(&h), vec!["dead-lettered without cause"]);
        h.consumer_app_stalled = true;
        assert!(kinds(&h).is_empty(), "{:?}", kinds(&h));

        let mut h = good();
        h.dead_letters[0].1 =
            "DeadlineExceeded: the handler did not answer within handler_timeout_ms (5000 ms)"
                .into();
        assert!(kinds(&h).is_empty(), "a last call past the handler timeout");
        h.dead_letters[0].1 = "the app's connection broke during 3 calls".into();
        assert_eq!(
            kinds(&h),
            vec!["poison message dead-lettered for another cause"]
        );

        let mut h = good();
        h.log[0].value = "other".into();
        assert_eq!(kinds(&h), vec!["content replaced", "id replaced"]);

        let mut h = good();
        h.conflicts[0].answer = "COMMITTED".into();
        assert_eq!(kinds(&h), vec!["conflicting reuse accepted"]);
        h.conflicts[0].answer = "UNAVAILABLE: tcp connect error".into();
        assert!(kinds(&h).is_empty(), "never heard is not accepted");

        let mut h = good();
        h.stalled = Some("lag 3".into());
        assert_eq!(kinds(&h), vec!["stalled"]);
    }
}
