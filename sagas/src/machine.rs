//! One saga's state machine, without I/O: events in, effects out, the shape
//! of the consumer-group and transaction cores in the coordinator. Time
//! comes in with every event; nothing here reads a clock.
//!
//! Forward: a branch's action is called once every branch it waits for has
//! succeeded. A call answered in an unknown way (error, timeout, the
//! participant down) is called again after a backoff, up to the branch's
//! `max_attempts`; a business failure is never retried. The saga succeeds
//! when every action has.
//!
//! Backward: a business failure, an action out of attempts or the saga's
//! timeout turns the saga to compensating. No action is called from then
//! on; actions still in flight are waited for (until their answer or their
//! call timeout). Then every branch whose action was called at least once
//! (it may have taken effect even if no answer said so) is compensated,
//! one at a time, in reverse order of the end of their actions;
//! compensations are retried with backoff until they succeed (they must be
//! able to). A branch whose action was never called, or whose calls never
//! reached its service (no sidecar of it took them), is recorded as not
//! run (a null compensation) and never called.
//!
//! Effects come in the order the shell must perform them: first
//! [`Effect::Save`] with the saga's whole progress, then the calls it
//! names, then [`Effect::Finish`]. A call's number is saved before the call
//! goes out, so after a restart ([`Event::Recover`]) a call is repeated
//! under a new number, and each number is used at most once. Answers to
//! anything but the current call of an operation are ignored; a duplicate
//! answer changes nothing. Participants make repeated calls harmless with
//! their branch barrier, keyed by saga, branch and operation, never by the
//! call number.

use crate::definition::SagaDef;
use crate::error::{Error, Result};

/// How long after a call's deadline the saga takes it for unanswered by
/// itself: the shell answers every call by its deadline (with the answer,
/// or why there is none), so this only catches a shell that lost one, and
/// an answer saying the call reached no one is never beaten by the clock.
pub const CALL_GRACE_MS: i64 = 1_000;

/// Longest failure reason kept in a saga's progress, in bytes.
pub const MAX_REASON: usize = 1024;

/// `reason` cut to at most [`MAX_REASON`] bytes (at a character boundary):
/// the text of an answer is the participant's, and the progress record
/// holding it must stay small.
pub fn clip(mut reason: String) -> String {
    if reason.len() > MAX_REASON {
        let mut end = MAX_REASON - 3;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push_str("...");
    }
    reason
}

/// Where a saga is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum SagaStatus {
    /// Going forward.
    Running = 0,
    /// Undoing what was done.
    Compensating = 1,
    /// Every action succeeded (final).
    Succeeded = 2,
    /// Every action that may have run was compensated (final).
    Compensated = 3,
}

/// Where one action or compensation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum OpStatus {
    /// Not called yet.
    Pending = 0,
    /// Call number `calls` is out, until `at_ms`.
    Calling = 1,
    /// Waiting until `at_ms` to call again.
    Backoff = 2,
    /// Done (final).
    Succeeded = 3,
    /// An action that failed for good or was given up (final).
    Failed = 4,
    /// A compensation not needed: its action never ran, or there is nothing
    /// to undo (final).
    Skipped = 5,
}

/// Which of a branch's two operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// The forward operation.
    Action = 0,
    /// The operation that undoes it.
    Compensation = 1,
}

/// Progress of one operation.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OpRecord {
    /// An [`OpStatus`].
    #[prost(enumeration = "OpStatus", tag = "1")]
    pub status: i32,
    /// Calls made so far; the current call's number.
    #[prost(uint32, tag = "2")]
    pub calls: u32,
    /// Calls that failed or went unanswered.
    #[prost(uint32, tag = "3")]
    pub failures: u32,
    /// Calling: the call's deadline; Backoff: when to call again (ms).
    #[prost(int64, tag = "4")]
    pub at_ms: i64,
    /// The latest failure, or why a compensation was skipped.
    #[prost(string, tag = "5")]
    pub error: String,
    /// Some call may have reached the service (an action never delivered
    /// never ran, and is not compensated).
    #[prost(bool, tag = "6")]
    pub delivered: bool,
}

/// Progress of one branch.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BranchRecord {
    /// The action, then the compensation (always two).
    #[prost(message, repeated, tag = "1")]
    pub ops: Vec<OpRecord>,
    /// When the action ended, as a rank among the saga's actions (1 for
    /// the first to end); 0 while it has not.
    #[prost(uint32, tag = "2")]
    pub ended: u32,
}

impl BranchRecord {
    /// The progress of `op`.
    pub fn op(&self, op: Op) -> &OpRecord {
        &self.ops[op as usize]
    }
}

/// A saga's whole progress: the value stored after each change, from
/// which [`Saga::restore`] rebuilds the saga (with its definition).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SagaRecord {
    /// The saga's id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// A [`SagaStatus`].
    #[prost(enumeration = "SagaStatus", tag = "2")]
    pub status: i32,
    /// Why it is compensating.
    #[prost(string, tag = "3")]
    pub reason: String,
    /// When it started (ms).
    #[prost(int64, tag = "4")]
    pub started_ms: i64,
    /// When it finished (ms); 0 while it runs.
    #[prost(int64, tag = "5")]
    pub finished_ms: i64,
    /// How many actions have ended.
    #[prost(uint32, tag = "6")]
    pub ended: u32,
    /// One per branch of the definition, in its order.
    #[prost(message, repeated, tag = "7")]
    pub branches: Vec<BranchRecord>,
}

/// How a call was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It did what it was asked.
    Succeeded,
    /// A business failure: the action did not take effect and never will
    /// on a retry (out of stock, card declined). For a compensation it
    /// counts as [`Outcome::Unknown`]: compensations are retried.
    Failed(String),
    /// No usable answer: an error, a lost connection, the participant down.
    /// It may or may not have taken effect; it is called again.
    Unknown(String),
    /// The call never reached the service (no sidecar of it was there to
    /// take it): as [`Outcome::Unknown`], except that it certainly did not
    /// take effect.
    NotDelivered(String),
}

/// Something that happened to the saga.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The answer to call number `call` of `op` of branch `branch`.
    Answer {
        /// Index of the branch in the definition.
        branch: u32,
        /// Which operation was called.
        op: Op,
        /// The call's number, from [`Call::call`].
        call: u32,
        /// What it answered.
        outcome: Outcome,
    },
    /// Time passed: calls past their deadline count as unanswered, waits
    /// that are over end, the saga's own timeout fires. Send it at
    /// [`Saga::next_deadline`].
    Tick,
    /// The saga was just restored after a restart: calls that were out are
    /// repeated under new numbers (or given up, while compensating).
    Recover,
}

/// A call the shell must make.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Call {
    /// Index of the branch in the definition.
    pub branch: u32,
    /// Which operation.
    pub op: Op,
    /// The call's number, to be handed back with its answer.
    pub call: u32,
    /// The call's limit: the shell answers by then (an answer, or why
    /// there is none); the saga takes it for unanswered by itself
    /// [`CALL_GRACE_MS`] later.
    pub deadline_ms: i64,
}

/// What the shell must do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Store the saga's progress durably before anything after it.
    Save(SagaRecord),
    /// Call a participant.
    Call(Call),
    /// The saga reached its final status.
    Finish(SagaStatus),
}

/// One saga: its definition and its progress.
#[derive(Clone, Debug)]
pub struct Saga {
    def: SagaDef,
    rec: SagaRecord,
}

fn op_record() -> OpRecord {
    OpRecord {
        status: OpStatus::Pending as i32,
        calls: 0,
        failures: 0,
        at_ms: 0,
        error: String::new(),
        delivered: false,
    }
}

impl Saga {
    /// Starts saga `id` at `now_ms`: checks the definition and calls the
    /// actions that wait for nothing.
    pub fn start(id: &str, def: SagaDef, now_ms: i64) -> Result<(Saga, Vec<Effect>)> {
        def.validate()?;
        let rec = SagaRecord {
            id: id.into(),
            status: SagaStatus::Running as i32,
            reason: String::new(),
            started_ms: now_ms,
            finished_ms: 0,
            ended: 0,
            branches: def
                .branches
                .iter()
                .map(|_| BranchRecord {
                    ops: vec![op_record(), op_record()],
                    ended: 0,
                })
                .collect(),
        };
        let mut saga = Saga { def, rec };
        let mut calls = Vec::new();
        saga.advance(now_ms, &mut calls);
        let effects = saga.effects(true, calls);
        Ok((saga, effects))
    }

    /// Rebuilds a saga from its definition and its latest stored record;
    /// follow with [`Event::Recover`].
    pub fn restore(def: SagaDef, rec: SagaRecord) -> Result<Saga> {
        let corrupt = |reason: String| Error::Corrupt {
            id: rec.id.clone(),
            reason,
        };
        def.validate()?;
        if SagaStatus::try_from(rec.status).is_err() {
            return Err(corrupt(format!("unknown status {}", rec.status)));
        }
        if rec.branches.len() != def.branches.len() {
            return Err(corrupt(format!(
                "{} branches recorded, {} defined",
                rec.branches.len(),
                def.branches.len()
            )));
        }
        for (i, b) in rec.branches.iter().enumerate() {
            if b.ops.len() != 2 {
                return Err(corrupt(format!(
                    "branch {i} has {} operations",
                    b.ops.len()
                )));
            }
            if let Some(o) = b.ops.iter().find(|o| OpStatus::try_from(o.status).is_err()) {
                return Err(corrupt(format!("branch {i}: unknown status {}", o.status)));
            }
        }
        Ok(Saga { def, rec })
    }

    /// The definition.
    pub fn definition(&self) -> &SagaDef {
        &self.def
    }

    /// The progress, as stored.
    pub fn record(&self) -> &SagaRecord {
        &self.rec
    }

    /// Where the saga is.
    pub fn status(&self) -> SagaStatus {
        self.rec.status()
    }

    /// Whether it reached a final status.
    pub fn is_finished(&self) -> bool {
        matches!(
            self.status(),
            SagaStatus::Succeeded | SagaStatus::Compensated
        )
    }

    /// When the next [`Event::Tick`] is due (ms), if anything waits on
    /// time.
    pub fn next_deadline(&self) -> Option<i64> {
        if self.is_finished() {
            return None;
        }
        let mut next = None::<i64>;
        let mut at = |t: i64| next = Some(next.map_or(t, |n| n.min(t)));
        for b in &self.rec.branches {
            for o in &b.ops {
                if matches!(o.status(), OpStatus::Calling | OpStatus::Backoff) {
                    at(o.at_ms);
                }
            }
        }
        if self.status() == SagaStatus::Running && self.def.timeout_ms > 0 {
            at(self.deadline_ms());
        }
        next
    }

    /// Applies `event`, which happened at `now_ms`; returns what must be
    /// done, in order. A finished saga ignores everything.
    pub fn apply(&mut self, event: Event, now_ms: i64) -> Vec<Effect> {
        if self.is_finished() {
            return Vec::new();
        }
        let before = self.rec.clone();
        match event {
            Event::Answer {
                branch,
                op,
                call,
                outcome,
            } => self.on_answer(branch, op, call, outcome, now_ms),
            Event::Tick => self.on_time(now_ms),
            Event::Recover => self.on_recover(now_ms),
        }
        let mut calls = Vec::new();
        self.advance(now_ms, &mut calls);
        let changed = self.rec != before;
        self.effects(changed, calls)
    }

    fn effects(&self, changed: bool, calls: Vec<Call>) -> Vec<Effect> {
        let mut out = Vec::with_capacity(calls.len() + 2);
        if changed {
            out.push(Effect::Save(self.rec.clone()));
        }
        out.extend(calls.into_iter().map(Effect::Call));
        if self.is_finished() {
            out.push(Effect::Finish(self.status()));
        }
        out
    }

    fn deadline_ms(&self) -> i64 {
        self.rec
            .started_ms
            .saturating_add(i64::try_from(self.def.timeout_ms).unwrap_or(i64::MAX))
    }

    fn op_mut(&mut self, b: usize, op: Op) -> &mut OpRecord {
        &mut self.rec.branches[b].ops[op as usize]
    }

    fn on_answer(&mut self, branch: u32, op: Op, call: u32, outcome: Outcome, now: i64) {
        let b = branch as usize;
        let Some(br) = self.rec.branches.get(b) else {
            return;
        };
        let o = br.op(op);
        if o.status() != OpStatus::Calling || o.calls != call {
            return; // an earlier call's answer, or a repeat: nothing changes
        }
        let outcome = match outcome {
            Outcome::Failed(r) => Outcome::Failed(clip(r)),
            Outcome::Unknown(r) => Outcome::Unknown(clip(r)),
            Outcome::NotDelivered(r) => Outcome::NotDelivered(clip(r)),
            o => o,
        };
        if !matches!(outcome, Outcome::NotDelivered(_)) {
            self.op_mut(b, op).delivered = true;
        }
        match (op, outcome) {
            (Op::Action, Outcome::Succeeded) => {
                self.op_mut(b, op).set_status(OpStatus::Succeeded);
                self.end_action(b);
            }
            (Op::Action, Outcome::Failed(reason)) => {
                let o = self.op_mut(b, op);
                o.set_status(OpStatus::Failed);
                o.error = reason.clone();
                self.end_action(b);
                let name = &self.def.branches[b].name;
                self.compensate(format!("branch {name} failed: {reason}"));
            }
            (Op::Action, Outcome::Unknown(reason) | Outcome::NotDelivered(reason)) => {
                self.action_unanswered(b, reason, now)
            }
            (Op::Compensation, Outcome::Succeeded) => {
                self.op_mut(b, op).set_status(OpStatus::Succeeded);
            }
            (
                Op::Compensation,
                Outcome::Failed(reason) | Outcome::Unknown(reason) | Outcome::NotDelivered(reason),
            ) => {
                self.retry_compensation(b, reason, now);
            }
        }
    }

    /// An action call failed in an unknown way: call again after a
    /// backoff, or give it up (out of attempts, or compensating).
    fn action_unanswered(&mut self, b: usize, reason: String, now: i64) {
        let running = self.status() == SagaStatus::Running;
        let def = &self.def.branches[b];
        let (max, name) = (def.max_attempts, def.name.clone());
        let o = &mut self.rec.branches[b].ops[Op::Action as usize];
        o.failures += 1;
        o.error = reason.clone();
        if running && o.failures < max {
            o.set_status(OpStatus::Backoff);
            o.at_ms = now.saturating_add(as_ms(def.backoff_ms(o.failures)));
            return;
        }
        o.set_status(OpStatus::Failed);
        let failures = o.failures;
        self.end_action(b);
        self.compensate(format!(
            "branch {name} gave up after {failures} attempts: {reason}"
        ));
    }

    fn retry_compensation(&mut self, b: usize, reason: String, now: i64) {
        let def = &self.def.branches[b];
        let o = &mut self.rec.branches[b].ops[Op::Compensation as usize];
        o.failures += 1;
        o.error = reason;
        o.set_status(OpStatus::Backoff);
        o.at_ms = now.saturating_add(as_ms(def.backoff_ms(o.failures)));
    }

    fn end_action(&mut self, b: usize) {
        self.rec.ended += 1;
        self.rec.branches[b].ended = self.rec.ended;
    }

    /// Turns a running saga to compensating: actions waiting to be called
    /// again are given up (they end now).
    fn compensate(&mut self, reason: String) {
        if self.status() != SagaStatus::Running {
            return;
        }
        self.rec.set_status(SagaStatus::Compensating);
        self.rec.reason = reason;
        for b in 0..self.rec.branches.len() {
            let o = self.op_mut(b, Op::Action);
            if o.status() == OpStatus::Backoff {
                o.set_status(OpStatus::Failed);
                self.end_action(b);
            }
        }
    }

    fn on_time(&mut self, now: i64) {
        for b in 0..self.rec.branches.len() {
            let def = &self.def.branches[b];
            let (timeout, service) = (def.timeout_ms, def.service.clone());
            for op in [Op::Action, Op::Compensation] {
                let o = self.rec.branches[b].op(op);
                if o.status() == OpStatus::Calling && o.at_ms <= now {
                    // Unanswered: it may have reached the service.
                    self.op_mut(b, op).delivered = true;
                    let o = self.rec.branches[b].op(op);
                    let reason = format!(
                        "call {} to service {service:?} unanswered after {timeout} ms",
                        o.calls
                    );
                    match op {
                        Op::Action => self.action_unanswered(b, reason, now),
                        Op::Compensation => self.retry_compensation(b, reason, now),
                    }
                }
            }
        }
        if self.status() == SagaStatus::Running
            && self.def.timeout_ms > 0
            && now >= self.deadline_ms()
        {
            self.compensate(format!("saga timed out after {} ms", self.def.timeout_ms));
        }
    }

    /// After a restart nobody knows what became of the calls that were out:
    /// make them again at once under new numbers, without counting a
    /// failure; an action that was out while compensating is given up.
    fn on_recover(&mut self, now: i64) {
        // A saga whose timeout passed while the coordinator was down turns
        // back before anything is called again.
        self.on_time(now);
        let compensating = self.status() == SagaStatus::Compensating;
        for b in 0..self.rec.branches.len() {
            for op in [Op::Action, Op::Compensation] {
                let o = self.op_mut(b, op);
                if o.status() != OpStatus::Calling {
                    continue;
                }
                o.delivered = true; // it may have gone out before the restart
                if op == Op::Action && compensating {
                    o.set_status(OpStatus::Failed);
                    o.error = "given up: restarted while compensating".into();
                    self.end_action(b);
                } else {
                    o.set_status(OpStatus::Backoff);
                    o.at_ms = now;
                }
            }
        }
    }

    fn call(&mut self, b: usize, op: Op, now: i64, calls: &mut Vec<Call>) {
        let timeout = as_ms(self.def.branches[b].timeout_ms);
        let o = self.op_mut(b, op);
        o.calls += 1;
        o.set_status(OpStatus::Calling);
        let deadline_ms = now.saturating_add(timeout);
        o.at_ms = deadline_ms.saturating_add(CALL_GRACE_MS);
        calls.push(Call {
            branch: b as u32,
            op,
            call: o.calls,
            deadline_ms,
        });
    }

    /// Calls what is ready to be called and notices the end.
    fn advance(&mut self, now: i64, calls: &mut Vec<Call>) {
        match self.status() {
            SagaStatus::Running => {
                for b in 0..self.rec.branches.len() {
                    let o = self.rec.branches[b].op(Op::Action);
                    let ready = match o.status() {
                        OpStatus::Pending => self.def.branches[b].after.iter().all(|&d| {
                            self.rec.branches[d as usize].op(Op::Action).status()
                                == OpStatus::Succeeded
                        }),
                        OpStatus::Backoff => o.at_ms <= now,
                        _ => false,
                    };
                    if ready {
                        self.call(b, Op::Action, now, calls);
                    }
                }
                let done = self
                    .rec
                    .branches
                    .iter()
                    .all(|b| b.op(Op::Action).status() == OpStatus::Succeeded);
                if done {
                    self.rec.set_status(SagaStatus::Succeeded);
                    self.rec.finished_ms = now;
                }
            }
            SagaStatus::Compensating => self.advance_compensation(now, calls),
            SagaStatus::Succeeded | SagaStatus::Compensated => {}
        }
    }

    fn advance_compensation(&mut self, now: i64, calls: &mut Vec<Call>) {
        let in_flight = |s: &Saga| {
            s.rec
                .branches
                .iter()
                .any(|b| b.op(Op::Action).status() == OpStatus::Calling)
        };
        if in_flight(self) {
            return; // wait for every action out to end first
        }
        for b in 0..self.rec.branches.len() {
            let action = self.rec.branches[b].op(Op::Action);
            let (never_called, never_delivered) = (action.calls == 0, !action.delivered);
            let never_ran = never_called || never_delivered;
            let nothing_to_undo = self.def.branches[b].compensation.is_empty();
            let o = self.op_mut(b, Op::Compensation);
            if o.status() == OpStatus::Pending && (never_ran || nothing_to_undo) {
                o.set_status(OpStatus::Skipped);
                o.error = if never_called {
                    "action never ran".into()
                } else if never_delivered {
                    "action never reached its service".into()
                } else {
                    "nothing to undo".into()
                };
            }
        }
        // The undone branch whose action ended last goes first.
        let next = (0..self.rec.branches.len())
            .filter(|&b| {
                !matches!(
                    self.rec.branches[b].op(Op::Compensation).status(),
                    OpStatus::Succeeded | OpStatus::Skipped
                )
            })
            .max_by_key(|&b| self.rec.branches[b].ended);
        let Some(b) = next else {
            self.rec.set_status(SagaStatus::Compensated);
            self.rec.finished_ms = now;
            return;
        };
        let o = self.rec.branches[b].op(Op::Compensation);
        let due = match o.status() {
            OpStatus::Pending => true,
            OpStatus::Backoff => o.at_ms <= now,
            _ => false,
        };
        if due {
            self.call(b, Op::Compensation, now, calls);
        }
    }
}

fn as_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::BranchDef;

    fn def(n: usize) -> SagaDef {
        SagaDef::sequential(
            (0..n)
                .map(|i| BranchDef::new(&format!("b{i}"), "svc", "do", "undo"))
                .collect(),
        )
    }

    fn calls(effects: &[Effect]) -> Vec<Call> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Call(c) => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    fn answer(c: &Call, outcome: Outcome) -> Event {
        Event::Answer {
            branch: c.branch,
            op: c.op,
            call: c.call,
            outcome,
        }
    }

    fn one(effects: &[Effect]) -> Call {
        let c = calls(effects);
        assert_eq!(c.len(), 1, "{effects:?}");
        c[0].clone()
    }

    #[test]
    fn a_sequential_saga_calls_each_action_after_the_one_before() {
        let (mut s, e) = Saga::start("s1", def(3), 0).expect("valid");
        assert!(matches!(e[0], Effect::Save(_)));
        let c = one(&e);
        assert_eq!(
            (c.branch, c.op, c.call, c.deadline_ms),
            (0, Op::Action, 1, 10_000)
        );
        let c = one(&s.apply(answer(&c, Outcome::Succeeded), 5));
        assert_eq!(c.branch, 1);
        let c = one(&s.apply(answer(&c, Outcome::Succeeded), 6));
        assert_eq!(c.branch, 2);
        let e = s.apply(answer(&c, Outcome::Succeeded), 7);
        assert_eq!(e.last(), Some(&Effect::Finish(SagaStatus::Succeeded)));
        assert!(s.apply(Event::Tick, 100_000).is_empty());
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn a_business_failure_compensates_the_done_branches_in_reverse() {
        let (mut s, e) = Saga::start("s1", def(4), 0).expect("valid");
        let c0 = one(&e);
        let c1 = one(&s.apply(answer(&c0, Outcome::Succeeded), 1));
        let c2 = one(&s.apply(answer(&c1, Outcome::Succeeded), 2));
        let e = s.apply(answer(&c2, Outcome::Failed("declined".into())), 3);
        assert_eq!(s.status(), SagaStatus::Compensating);
        assert_eq!(s.record().reason, "branch b2 failed: declined");
        // The failed branch first (its action may have half happened: its
        // barrier makes this a null compensation), then 1, then 0.
        let k2 = one(&e);
        assert_eq!((k2.branch, k2.op), (2, Op::Compensation));
        let k1 = one(&s.apply(answer(&k2, Outcome::Succeeded), 4));
        assert_eq!(k1.branch, 1);
        let k0 = one(&s.apply(answer(&k1, Outcome::Succeeded), 5));
        assert_eq!(k0.branch, 0);
        let e = s.apply(answer(&k0, Outcome::Succeeded), 6);
        assert_eq!(e.last(), Some(&Effect::Finish(SagaStatus::Compensated)));
        let b3 = s.record().branches[3].op(Op::Compensation);
        assert_eq!(b3.status(), OpStatus::Skipped);
        assert_eq!(b3.error, "action never ran");
    }

    #[test]
    fn unknown_answers_are_retried_with_backoff_until_the_attempts_run_out() {
        let mut d = def(2);
        d.branches[1].max_attempts = 3;
        d.branches[1].initial_backoff_ms = 100;
        let (mut s, e) = Saga::start("s1", d, 0).expect("valid");
        let c = one(&e);
        let c = one(&s.apply(answer(&c, Outcome::Succeeded), 0));
        let e = s.apply(answer(&c, Outcome::Unknown("unavailable".into())), 10);
        assert!(calls(&e).is_empty());
        assert_eq!(s.next_deadline(), Some(110));
        assert!(calls(&s.apply(Event::Tick, 109)).is_empty());
        let c = one(&s.apply(Event::Tick, 110));
        assert_eq!(c.call, 2);
        // The call times out (10 s), the backoff doubles.
        let e = s.apply(Event::Tick, c.deadline_ms + CALL_GRACE_MS);
        assert!(calls(&e).is_empty());
        let retry = c.deadline_ms + CALL_GRACE_MS + 200;
        assert_eq!(s.next_deadline(), Some(retry));
        let c = one(&s.apply(Event::Tick, retry));
        assert_eq!(c.call, 3);
        // A late answer to call 2 changes nothing.
        let late = Event::Answer {
            branch: 1,
            op: Op::Action,
            call: 2,
            outcome: Outcome::Succeeded,
        };
        assert!(s.apply(late, 30_000).is_empty());
        let e = s.apply(answer(&c, Outcome::Unknown("boom".into())), 30_001);
        assert_eq!(s.status(), SagaStatus::Compensating);
        assert_eq!(
            s.record().reason,
            "branch b1 gave up after 3 attempts: boom"
        );
        let k = one(&e);
        assert_eq!((k.branch, k.op), (1, Op::Compensation));
    }

    #[test]
    fn compensations_are_retried_until_they_succeed() {
        let (mut s, e) = Saga::start("s1", def(1), 0).expect("valid");
        let c = one(&e);
        let k = one(&s.apply(answer(&c, Outcome::Failed("no".into())), 0));
        let mut k = k;
        let mut now = 0;
        for _ in 0..20 {
            assert!(calls(&s.apply(answer(&k, Outcome::Failed("db down".into())), now)).is_empty());
            now = s.next_deadline().expect("a retry is due");
            k = one(&s.apply(Event::Tick, now));
        }
        assert_eq!(k.call, 21);
        let e = s.apply(answer(&k, Outcome::Succeeded), now);
        assert_eq!(e.last(), Some(&Effect::Finish(SagaStatus::Compensated)));
    }

    #[test]
    fn concurrent_branches_are_compensated_after_every_action_out_has_ended() {
        let mut d = def(3);
        for b in &mut d.branches {
            b.after.clear();
        }
        let (mut s, e) = Saga::start("s1", d, 0).expect("valid");
        let c = calls(&e);
        assert_eq!(c.len(), 3, "all three start at once");
        let e = s.apply(answer(&c[1], Outcome::Failed("no".into())), 1);
        assert!(calls(&e).is_empty(), "0 and 2 are still out");
        assert!(calls(&s.apply(answer(&c[2], Outcome::Succeeded), 2)).is_empty());
        // Branch 0's answer never comes: it times out and ends last.
        let k = one(&s.apply(Event::Tick, c[0].deadline_ms + CALL_GRACE_MS));
        assert_eq!((k.branch, k.op), (0, Op::Compensation));
        let k = one(&s.apply(answer(&k, Outcome::Succeeded), 10_001));
        assert_eq!(k.branch, 2);
        let k = one(&s.apply(answer(&k, Outcome::Succeeded), 10_002));
        assert_eq!(k.branch, 1);
    }

    #[test]
    fn the_saga_timeout_turns_it_back() {
        let mut d = def(2);
        d.timeout_ms = 1_000;
        d.branches[0].timeout_ms = 60_000;
        let (mut s, e) = Saga::start("s1", d, 0).expect("valid");
        let c = one(&e);
        assert_eq!(s.next_deadline(), Some(1_000));
        assert!(calls(&s.apply(Event::Tick, 1_000)).is_empty());
        assert_eq!(s.record().reason, "saga timed out after 1000 ms");
        // The action out still gets its answer before compensation starts.
        let k = one(&s.apply(answer(&c, Outcome::Succeeded), 1_500));
        assert_eq!((k.branch, k.op), (0, Op::Compensation));
    }

    #[test]
    fn a_restart_repeats_the_calls_that_were_out_under_new_numbers() {
        let (mut s, e) = Saga::start("s1", def(2), 0).expect("valid");
        let saved = match &e[0] {
            Effect::Save(r) => r.clone(),
            other => panic!("{other:?}"),
        };
        let c = one(&e);
        let mut r = Saga::restore(s.definition().clone(), saved).expect("fits");
        let c2 = one(&r.apply(Event::Recover, 50));
        assert_eq!((c2.branch, c2.call), (0, 2));
        assert_eq!(r.record().branches[0].op(Op::Action).failures, 0);
        // The answer to the call made before the restart is stale.
        assert!(r.apply(answer(&c, Outcome::Succeeded), 60).is_empty());
        assert_eq!(one(&r.apply(answer(&c2, Outcome::Succeeded), 61)).branch, 1);
        // The original, not restored, is a different object: unchanged.
        assert_eq!(s.apply(Event::Tick, 1).len(), 0);
    }

    #[test]
    fn a_restart_past_the_saga_timeout_turns_it_back_without_calling_forward() {
        let mut d = def(2);
        d.timeout_ms = 1_000;
        let (s, e) = Saga::start("s1", d.clone(), 0).expect("valid");
        let c = one(&e);
        let mut r = Saga::restore(d, s.record().clone()).expect("fits");
        let e = r.apply(Event::Recover, 5_000);
        assert_eq!(r.status(), SagaStatus::Compensating);
        // The action that was out is given up, not repeated; its
        // compensation goes out (a null one at its barrier).
        let k = one(&e);
        assert_eq!((k.branch, k.op), (0, Op::Compensation), "{c:?}");
    }

    #[test]
    fn long_reasons_are_clipped() {
        let (mut s, e) = Saga::start("s1", def(1), 0).expect("valid");
        let c = one(&e);
        s.apply(answer(&c, Outcome::Failed("é".repeat(5000))), 1);
        let err = &s.record().branches[0].op(Op::Action).error;
        assert!(
            err.len() <= MAX_REASON && err.ends_with("..."),
            "{}",
            err.len()
        );
        assert!(s.record().reason.len() <= MAX_REASON + 64);
    }

    #[test]
    fn a_record_that_does_not_fit_is_refused() {
        let (s, _) = Saga::start("s1", def(2), 0).expect("valid");
        let mut rec = s.record().clone();
        rec.branches.pop();
        let err = Saga::restore(def(2), rec).expect_err("one branch short");
        assert!(
            err.to_string().contains("1 branches recorded, 2 defined"),
            "{err}"
        );
        let mut rec = s.record().clone();
        rec.status = 42;
        assert!(Saga::restore(def(2), rec).is_err());
    }
}
