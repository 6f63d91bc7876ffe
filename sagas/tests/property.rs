//! The saga state machine against participants that keep a branch barrier,
//! under any interleaving of answers, lost answers, lost calls, repeated
//! and late answers, time passing and restarts from the last saved record.
//!
//! Whatever happens, once the participants answer again the saga ends
//! either with every action in effect once and nothing compensated, or
//! with nothing in effect: every branch whose action was called is
//! compensated, in reverse order of the end of the actions, and a branch
//! whose action was never called is never compensated. Each call number of
//! an operation is used once, even across restarts; no action is called
//! once compensation has begun, nor before the branches it waits for have
//! succeeded; repeated answers change nothing.

use std::collections::HashSet;

use proptest::prelude::*;
use tandem_sagas::{
    BranchDef, Call, Effect, Event, Op, OpStatus, Outcome, Saga, SagaDef, SagaRecord, SagaStatus,
};

/// One participant's view of one branch, kept the way the sidecar's
/// barrier keeps it: a row per (saga, branch, operation) written in the
/// same local transaction as the business effect.
#[derive(Clone, Debug, Default)]
struct Barrier {
    action_row: bool,
    compensation_row: bool,
    /// The business effect of the action is in the participant's tables.
    in_effect: bool,
}

impl Barrier {
    fn action(&mut self, business_ok: bool) -> Outcome {
        if self.compensation_row {
            return Outcome::Failed("refused: already compensated".into()); // hanging
        }
        if self.action_row {
            return Outcome::Succeeded; // a repeat: done once already
        }
        if !business_ok {
            return Outcome::Failed("declined".into()); // rolled back, row and all
        }
        self.action_row = true;
        self.in_effect = true;
        Outcome::Succeeded
    }

    fn compensation(&mut self) -> Outcome {
        if self.compensation_row {
            return Outcome::Succeeded; // a repeat
        }
        self.compensation_row = true;
        if self.action_row {
            self.in_effect = false;
        }
        // Without an action row this is a null compensation: recorded (the
        // row refuses a late action), nothing undone.
        Outcome::Succeeded
    }
}

#[derive(Clone, Debug)]
enum Step {
    /// The participant runs call k and its answer arrives (business
    /// outcome per `ok`).
    Answer(usize, bool),
    /// The participant runs call k but its answer is lost.
    LoseAnswer(usize, bool),
    /// Call k never reaches the participant.
    LoseCall(usize),
    /// An answer already delivered arrives again.
    Repeat(usize),
    /// Time passes.
    Wait(i64),
    /// The coordinator restarts from the last saved record.
    Restart,
    /// A compensation fails for a while (database down): answered unknown.
    CompensationDown(usize),
    /// No sidecar of the service is there to take call k: it is answered
    /// as never delivered, and the participant never sees it.
    NoSidecar(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (any::<usize>(), prop::bool::weighted(0.8)).prop_map(|(k, ok)| Step::Answer(k, ok)),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(k, ok)| Step::LoseAnswer(k, ok)),
        1 => any::<usize>().prop_map(Step::LoseCall),
        1 => any::<usize>().prop_map(Step::Repeat),
        2 => (1i64..800).prop_map(Step::Wait),
        1 => Just(Step::Restart),
        1 => any::<usize>().prop_map(Step::CompensationDown),
        1 => any::<usize>().prop_map(Step::NoSidecar),
    ]
}

fn definition() -> impl Strategy<Value = SagaDef> {
    let branch = (
        any::<u64>(),
        1u32..=3,
        50u64..=500,
        10u64..=100,
        100u64..=400,
        prop::bool::weighted(0.1),
    );
    (
        prop::collection::vec(branch, 1..=5),
        prop::bool::weighted(0.3),
        200u64..=3000,
    )
        .prop_map(|(bs, timed, timeout)| {
            let branches = bs
                .into_iter()
                .enumerate()
                .map(|(i, (deps, attempts, t, b0, b1, no_undo))| {
                    let mut b = BranchDef::new(&format!("b{i}"), "svc", "do", "undo");
                    b.after = (0..i as u32).filter(|d| deps & (1 << d) != 0).collect();
                    b.max_attempts = attempts;
                    b.timeout_ms = t;
                    b.initial_backoff_ms = b0;
                    b.max_backoff_ms = b1;
                    if no_undo {
                        b.compensation.clear();
                    }
                    b
                })
                .collect();
            SagaDef {
                branches,
                timeout_ms: if timed { timeout } else { 0 },
            }
        })
}

/// Everything observed of one run, and the checks made as it goes.
struct Run {
    def: SagaDef,
    saga: Saga,
    saved: SagaRecord,
    now: i64,
    out: Vec<Call>,
    delivered: Vec<Event>,
    barriers: Vec<Barrier>,
    used: HashSet<(u32, Op, u32)>,
    action_called: Vec<bool>,
    /// Per branch, action calls issued and action calls answered as never
    /// delivered.
    action_calls: Vec<u32>,
    undelivered: Vec<u32>,
    compensations_called: Vec<u32>,
    /// Per branch, the number of the event at which its action ended
    /// (actions ending at one event may be undone in any order).
    ended: Vec<Option<usize>>,
    events: usize,
    finished: Option<SagaStatus>,
}

impl Run {
    fn new(def: SagaDef) -> Run {
        let n = def.branches.len();
        let (saga, effects) = Saga::start("saga-1", def.clone(), 0).expect("valid");
        let mut run = Run {
            def,
            saved: saga.record().clone(),
            saga,
            now: 0,
            out: Vec::new(),
            delivered: Vec::new(),
            barriers: vec![Barrier::default(); n],
            used: HashSet::new(),
            action_called: vec![false; n],
            action_calls: vec![0; n],
            undelivered: vec![0; n],
            compensations_called: Vec::new(),
            ended: vec![None; n],
            events: 0,
            finished: None,
        };
        let before = run.saga.record().clone();
        run.take(&before, effects);
        run
    }

    fn apply(&mut self, event: Event) -> usize {
        assert!(self.finished.is_none() || self.saga.is_finished());
        let before = self.saga.record().clone();
        let effects = self.saga.apply(event, self.now);
        let n = effects.len();
        self.take(&before, effects);
        n
    }

    fn take(&mut self, before: &SagaRecord, effects: Vec<Effect>) {
        let rec = self.saga.record().clone();
        let mut saved_here = false;
        for (i, e) in effects.into_iter().enumerate() {
            match e {
                Effect::Save(r) => {
                    assert_eq!(i, 0, "a save comes first");
                    assert_eq!(r, rec);
                    self.saved = r;
                    saved_here = true;
                }
                Effect::Call(c) => {
                    assert!(
                        saved_here,
                        "a call goes out only after its number was saved"
                    );
                    assert!(self.finished.is_none(), "a call after the end: {c:?}");
                    assert!(
                        self.used.insert((c.branch, c.op, c.call)),
                        "call number reused: {c:?}"
                    );
                    let b = c.branch as usize;
                    match c.op {
                        Op::Action => {
                            assert!(
                                self.compensations_called.is_empty(),
                                "an action after compensation began: {c:?}"
                            );
                            assert_eq!(rec.status(), SagaStatus::Running);
                            for &d in &self.def.branches[b].after {
                                assert_eq!(
                                    rec.branches[d as usize].op(Op::Action).status(),
                                    OpStatus::Succeeded,
                                    "branch {b} called before branch {d} it waits for"
                                );
                            }
                            self.action_called[b] = true;
                            self.action_calls[b] += 1;
                        }
                        Op::Compensation => {
                            assert!(
                                self.action_called[b],
                                "compensating branch {b}, whose action was never called"
                            );
                            assert!(!self.def.branches[b].compensation.is_empty());
                            assert!(
                                rec.branches
                                    .iter()
                                    .all(|x| x.op(Op::Action).status() != OpStatus::Calling),
                                "a compensation while an action is out"
                            );
                            if !self.compensations_called.contains(&c.branch) {
                                self.compensations_called.push(c.branch);
                            }
                        }
                    }
                    self.out.push(c);
                }
                Effect::Finish(s) => {
                    assert!(self.finished.is_none(), "finished twice");
                    assert_eq!(s, rec.status());
                    self.finished = Some(s);
                }
            }
        }
        // When actions ended, as the records show it.
        self.events += 1;
        for (b, (old, new)) in before.branches.iter().zip(&rec.branches).enumerate() {
            let fin = |s: OpStatus| matches!(s, OpStatus::Succeeded | OpStatus::Failed);
            if !fin(old.op(Op::Action).status()) && fin(new.op(Op::Action).status()) {
                assert_eq!(self.ended[b], None, "branch {b}'s action ended twice");
                self.ended[b] = Some(self.events);
            }
        }
    }

    fn pick(&mut self, k: usize) -> Option<Call> {
        if self.out.is_empty() {
            return None;
        }
        let i = k % self.out.len();
        Some(self.out.remove(i))
    }

    fn run_at_participant(&mut self, c: &Call, business_ok: bool) -> Outcome {
        let b = &mut self.barriers[c.branch as usize];
        match c.op {
            Op::Action => b.action(business_ok),
            Op::Compensation => b.compensation(),
        }
    }

    fn answer(&mut self, c: &Call, outcome: Outcome) {
        let ev = Event::Answer {
            branch: c.branch,
            op: c.op,
            call: c.call,
            outcome,
        };
        self.delivered.push(ev.clone());
        self.apply(ev);
    }

    fn step(&mut self, s: Step) {
        match s {
            Step::Answer(k, ok) => {
                if let Some(c) = self.pick(k) {
                    let o = self.run_at_participant(&c, ok);
                    self.answer(&c, o);
                }
            }
            Step::LoseAnswer(k, ok) => {
                if let Some(c) = self.pick(k) {
                    self.run_at_participant(&c, ok);
                }
            }
            Step::LoseCall(k) => {
                self.pick(k);
            }
            Step::Repeat(k) => {
                if !self.delivered.is_empty() {
                    // Every record is saved, so even across restarts an
                    // answer seen before is spent: it must change nothing.
                    let ev = self.delivered[k % self.delivered.len()].clone();
                    assert_eq!(self.apply(ev), 0, "a repeated answer had effects");
                }
            }
            Step::Wait(ms) => {
                self.now += ms;
                self.apply(Event::Tick);
            }
            Step::Restart => {
                let mut saga =
                    Saga::restore(self.def.clone(), self.saved.clone()).expect("own record fits");
                std::mem::swap(&mut self.saga, &mut saga);
                self.apply(Event::Recover);
            }
            Step::NoSidecar(k) => {
                if let Some(c) = self.pick(k) {
                    // Counted only when it is the current call's answer: a
                    // call the saga already took for unanswered may have
                    // gone out, for all it knows.
                    let o = self.saga.record().branches[c.branch as usize].op(c.op);
                    if c.op == Op::Action && o.status() == OpStatus::Calling && o.calls == c.call {
                        self.undelivered[c.branch as usize] += 1;
                    }
                    self.answer(&c, Outcome::NotDelivered("no sidecar".into()));
                }
            }
            Step::CompensationDown(k) => {
                let Some(i) = (!self.out.is_empty()).then(|| k % self.out.len()) else {
                    return;
                };
                if self.out[i].op == Op::Compensation {
                    let c = self.out.remove(i);
                    self.answer(&c, Outcome::Unknown("database unreachable".into()));
                }
            }
        }
    }

    /// Participants answer every call honestly from now on, and time runs.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            if self.saga.is_finished() {
                return;
            }
            if let Some(c) = self.pick(0) {
                let o = self.run_at_participant(&c, true);
                self.answer(&c, o);
            } else if let Some(t) = self.saga.next_deadline() {
                self.now = self.now.max(t);
                self.apply(Event::Tick);
            } else {
                panic!(
                    "stuck: nothing out, nothing due, not finished: {:?}",
                    self.saga.record()
                );
            }
        }
        panic!("did not finish: {:?}", self.saga.record());
    }

    fn check_end(&self) {
        let rec = self.saga.record();
        match self.finished.expect("finished") {
            SagaStatus::Succeeded => {
                assert!(self.compensations_called.is_empty());
                for (b, x) in self.barriers.iter().enumerate() {
                    assert!(x.in_effect, "branch {b}: {x:?}");
                }
            }
            SagaStatus::Compensated => {
                for (b, x) in self.barriers.iter().enumerate() {
                    let undo = !self.def.branches[b].compensation.is_empty();
                    if undo {
                        assert!(!x.in_effect, "branch {b} still in effect: {x:?}");
                    }
                    let comp = rec.branches[b].op(Op::Compensation).status();
                    // An action none of whose calls was delivered never
                    // ran: it is not compensated.
                    let never_delivered =
                        self.action_calls[b] > 0 && self.undelivered[b] == self.action_calls[b];
                    if never_delivered {
                        assert_eq!(comp, OpStatus::Skipped, "branch {b}");
                        assert!(
                            !self.compensations_called.contains(&(b as u32)),
                            "branch {b}"
                        );
                    } else if self.action_called[b] && undo {
                        assert_eq!(comp, OpStatus::Succeeded, "branch {b}");
                    } else {
                        assert_eq!(comp, OpStatus::Skipped, "branch {b}");
                    }
                }
                // Reverse order of the end of the actions.
                let at: Vec<usize> = self
                    .compensations_called
                    .iter()
                    .map(|&b| self.ended[b as usize].expect("a compensated action ended"))
                    .collect();
                assert!(
                    at.windows(2).all(|w| w[0] >= w[1]),
                    "compensated {:?}, their actions ended at events {at:?}",
                    self.compensations_called
                );
            }
            other => panic!("finished as {other:?}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn a_saga_ends_all_done_or_all_undone(def in definition(), steps in prop::collection::vec(step(), 0..80)) {
        let mut run = Run::new(def);
        for s in steps {
            run.step(s);
        }
        run.settle();
        run.check_end();
        // Nothing moves a finished saga.
        let before = run.saga.record().clone();
        assert_eq!(run.apply(Event::Tick), 0);
        assert_eq!(run.apply(Event::Recover), 0);
        assert_eq!(&before, run.saga.record());
    }
}
