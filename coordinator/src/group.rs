//! The consumer-group state machine for one (group, topic), without I/O.
//!
//! It decides which member holds which partition. A partition is granted
//! only while no member holds it: moving a partition from a live member
//! first revokes it there, and it is granted to the next member only once
//! the old holder has released it (acknowledged what it was given) or has
//! left. Every grant carries a fresh epoch, so a late acknowledgement from an
//! earlier holder can be told apart and ignored. The assignment is sticky:
//! members keep what they hold up to their fair share.

use std::collections::{BTreeMap, BTreeSet};

/// Something that happened to the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// A member joined.
    Join(String),
    /// A member left or died; what it held is free at once.
    Leave(String),
    /// A revoked partition's holder is done with it.
    Released {
        /// The partition.
        partition: u32,
        /// The epoch of the grant being released.
        epoch: u64,
    },
    /// The topic has this many partitions now (never fewer than before).
    Grown(u32),
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Start delivering `partition` to `member` under `epoch`.
    Grant {
        member: String,
        partition: u32,
        epoch: u64,
    },
    /// Stop delivering `partition` to `member`; report `Released` once its
    /// deliveries are acknowledged.
    Revoke {
        member: String,
        partition: u32,
        epoch: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Holder {
    member: String,
    epoch: u64,
    revoking: bool,
}

/// Membership and partition ownership of one (group, topic).
#[derive(Clone, Debug)]
pub(crate) struct GroupState {
    members: BTreeSet<String>,
    holders: Vec<Option<Holder>>,
    next_epoch: u64,
}

impl GroupState {
    pub(crate) fn new(partitions: u32) -> Self {
        GroupState {
            members: BTreeSet::new(),
            holders: vec![None; partitions as usize],
            next_epoch: 1,
        }
    }

    #[cfg(test)]
    pub(crate) fn member_count(&self) -> usize {
        self.members.len()
    }

    /// Applies an event; returns what must be done, in order.
    pub(crate) fn apply(&mut self, event: Event) -> Vec<Effect> {
        match event {
            Event::Join(m) => {
                if !self.members.insert(m) {
                    return Vec::new();
                }
            }
            Event::Leave(m) => {
                if !self.members.remove(&m) {
                    return Vec::new();
                }
                for h in &mut self.holders {
                    if h.as_ref().is_some_and(|h| h.member == m) {
                        *h = None;
                    }
                }
            }
            Event::Released { partition, epoch } => {
                let slot = self.holders.get_mut(partition as usize);
                match slot {
                    Some(h @ Some(_))
                        if h.as_ref().is_some_and(|h| h.epoch == epoch && h.revoking) =>
                    {
                        *h = None
                    }
                    _ => return Vec::new(), // stale or unknown: nothing changes
                }
            }
            Event::Grown(partitions) => {
                if partitions as usize <= self.holders.len() {
                    return Vec::new();
                }
                self.holders.resize(partitions as usize, None);
            }
        }
        self.rebalance()
    }

    /// The sticky target: every member gets its fair share (the first
    /// `P % n` members in id order one more), keeping what it holds.
    fn targets(&self) -> Vec<Option<String>> {
        let p = self.holders.len();
        let n = self.members.len();
        if n == 0 {
            return vec![None; p];
        }
        let quota: BTreeMap<&String, usize> = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| (m, p / n + usize::from(i < p % n)))
            .collect();
        let mut count: BTreeMap<&String, usize> = BTreeMap::new();
        let mut targets: Vec<Option<String>> = vec![None; p];
        for (i, h) in self.holders.iter().enumerate() {
            let Some(h) = h.as_ref().filter(|h| !h.revoking) else {
                continue;
            };
            let Some((m, q)) = quota.get_key_value(&h.member) else {
                continue;
            };
            let c = count.entry(m).or_default();
            if *c < *q {
                *c += 1;
                targets[i] = Some(h.member.clone());
            }
        }
        for t in targets.iter_mut().filter(|t| t.is_none()) {
            let m = quota
                .iter()
                .find(|(m, q)| count.get(*m).copied().unwrap_or(0) < **q)
                .map(|(m, _)| *m)
                .expect("quotas add up to the partition count");
            *count.entry(m).or_default() += 1;
            *t = Some(m.clone());
        }
        targets
    }

    fn rebalance(&mut self) -> Vec<Effect> {
        let targets = self.targets();
        let mut effects = Vec::new();
        for (p, (slot, target)) in self.holders.iter_mut().zip(targets).enumerate() {
            let partition = p as u32;
            match slot {
                None => {
                    if let Some(member) = target {
                        let epoch = self.next_epoch;
                        self.next_epoch += 1;
                        *slot = Some(Holder {
                            member: member.clone(),
                            epoch,
                            revoking: false,
                        });
                        effects.push(Effect::Grant {
                            member,
                            partition,
                            epoch,
                        });
                    }
                }
                Some(h) if !h.revoking && target.as_ref() != Some(&h.member) => {
                    h.revoking = true;
                    effects.push(Effect::Revoke {
                        member: h.member.clone(),
                        partition,
                        epoch: h.epoch,
                    });
                }
                Some(_) => {}
            }
        }
        effects
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Step {
        Join(u8),
        Leave(u8),
        /// Release the i-th partition being revoked, if any.
        Release(prop::sample::Index),
        /// The topic gains this many partitions.
        Grow(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..6).prop_map(Step::Join),
            (0u8..6).prop_map(Step::Leave),
            any::<prop::sample::Index>().prop_map(Step::Release),
            (1u8..4).prop_map(Step::Grow),
        ]
    }

    /// Checks effects against what is really being delivered: a grant only
    /// for a partition no one holds; a revoke only of the current holding.
    fn check(
        live: &mut HashMap<u32, (String, u64)>,
        revoking: &mut Vec<(u32, u64)>,
        effects: &[Effect],
    ) -> Result<(), TestCaseError> {
        for e in effects {
            match e {
                Effect::Grant {
                    member,
                    partition,
                    epoch,
                } => {
                    prop_assert!(
                        !live.contains_key(partition),
                        "partition {} granted while held: {:?}",
                        partition,
                        live.get(partition)
                    );
                    live.insert(*partition, (member.clone(), *epoch));
                }
                Effect::Revoke {
                    member,
                    partition,
                    epoch,
                } => {
                    prop_assert_eq!(live.get(partition), Some(&(member.clone(), *epoch)));
                    revoking.push((*partition, *epoch));
                }
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn never_two_holders_and_settles_fairly(partitions in 1u32..12, steps in prop::collection::vec(step(), 1..60)) {
            let mut partitions = partitions;
            let mut g = GroupState::new(partitions);
            let mut live: HashMap<u32, (String, u64)> = HashMap::new();
            let mut revoking: Vec<(u32, u64)> = Vec::new();
            for s in steps {
                let effects = match s {
                    Step::Join(m) => {
                        let before = g.member_count();
                        let e = g.apply(Event::Join(format!("m{m}")));
                        if g.member_count() > before {
                            let quota = (partitions as usize).div_ceil(g.member_count());
                            let revokes = e.iter().filter(|e| matches!(e, Effect::Revoke { .. })).count();
                            prop_assert!(revokes <= quota, "a join moves at most the newcomer's share");
                        }
                        e
                    }
                    Step::Leave(m) => {
                        let name = format!("m{m}");
                        live.retain(|_, (holder, _)| *holder != name);
                        revoking.retain(|(p, _)| live.contains_key(p));
                        g.apply(Event::Leave(name))
                    }
                    Step::Release(i) => {
                        if revoking.is_empty() {
                            continue;
                        }
                        let (p, epoch) = revoking.remove(i.index(revoking.len()));
                        live.remove(&p);
                        g.apply(Event::Released { partition: p, epoch })
                    }
                    Step::Grow(n) => {
                        partitions += u32::from(n);
                        g.apply(Event::Grown(partitions))
                    }
                };
                check(&mut live, &mut revoking, &effects)?;
            }
            // settle: release everything being revoked until nothing moves
            while let Some((p, epoch)) = revoking.pop() {
                live.remove(&p);
                let effects = g.apply(Event::Released { partition: p, epoch });
                check(&mut live, &mut revoking, &effects)?;
            }
            let members = g.member_count();
            if members == 0 {
                prop_assert!(live.is_empty());
            } else {
                prop_assert_eq!(live.len(), partitions as usize, "every partition held");
                let mut load: HashMap<&String, usize> = HashMap::new();
                for (m, _) in live.values() {
                    *load.entry(m).or_default() += 1;
                }
                let max = load.values().max().copied().unwrap_or(0);
                let min = if load.len() < members { 0 } else { load.values().min().copied().unwrap_or(0) };
                prop_assert!(max - min <= 1, "fair: {:?}", load);
            }
        }
    }

    #[test]
    fn stale_release_changes_nothing() {
        let mut g = GroupState::new(2);
        let e = g.apply(Event::Join("a".into()));
        assert_eq!(e.len(), 2);
        let e = g.apply(Event::Join("b".into()));
        assert_eq!(
            e,
            vec![Effect::Revoke {
                member: "a".into(),
                partition: 1,
                epoch: 2
            }]
        );
        assert!(
            g.apply(Event::Released {
                partition: 1,
                epoch: 1
            })
            .is_empty()
        );
        assert!(
            g.apply(Event::Released {
                partition: 0,
                epoch: 1
            })
            .is_empty(),
            "not being revoked"
        );
        assert_eq!(
            g.apply(Event::Released {
                partition: 1,
                epoch: 2
            }),
            vec![Effect::Grant {
                member: "b".into(),
                partition: 1,
                epoch: 3
            }]
        );
    }
}
