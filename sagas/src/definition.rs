//! What a saga is made of: ordered branches on participant services, each
//! an action with its compensation, a retry policy and a call timeout, and
//! which earlier branches it waits for. A definition is checked once, when
//! the saga is started; everything after trusts it.
//!
//! Branch `i` may wait only for branches before it (`after` holds smaller
//! indices), so index order is always an order the branches can run in and
//! a definition can never deadlock on itself. A sequential saga has every
//! branch wait for the one before it ([`SagaDef::sequential`]); branches
//! that wait for nothing in common run concurrently.

use bytes::Bytes;

use crate::error::{Error, Result};

/// Most branches one saga may have.
pub const MAX_BRANCHES: usize = 64;
/// Longest name of a branch, service, action or compensation, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Largest payload of one branch, in bytes.
pub const MAX_PAYLOAD: usize = 64 << 10;
/// Largest definition, encoded, in bytes (it is stored with every change
/// of the saga's progress).
pub const MAX_DEFINITION_BYTES: usize = 512 << 10;
/// Most attempts of one action (the first call included).
pub const MAX_ATTEMPTS: u32 = 1000;
/// Longest call timeout, backoff or saga timeout, in milliseconds (a day).
pub const MAX_DURATION_MS: u64 = 24 * 3600 * 1000;

/// Defaults of a branch's retry policy and timeout, in milliseconds.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Default time a branch call may take before it counts as unknown.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Default wait before the second attempt; doubles after each failure.
pub const DEFAULT_INITIAL_BACKOFF_MS: u64 = 200;
/// Default longest wait between two attempts.
pub const DEFAULT_MAX_BACKOFF_MS: u64 = 30_000;

/// One branch: an action on a participant service and the compensation
/// that undoes it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BranchDef {
    /// Unique within the saga; shown to operators and passed to the app.
    #[prost(string, tag = "1")]
    pub name: String,
    /// The participant service whose sidecar runs the branch.
    #[prost(string, tag = "2")]
    pub service: String,
    /// The operation the participant's app runs forward.
    #[prost(string, tag = "3")]
    pub action: String,
    /// The operation that undoes `action`; empty if there is nothing to
    /// undo (the branch is then never compensated).
    #[prost(string, tag = "4")]
    pub compensation: String,
    /// Opaque to Tandem: given to both the action and the compensation.
    #[prost(bytes = "bytes", tag = "5")]
    pub payload: Bytes,
    /// Indices of the branches whose actions must have succeeded before
    /// this one starts; all smaller than this branch's own index.
    #[prost(uint32, repeated, tag = "6")]
    pub after: Vec<u32>,
    /// Calls of the action before it is given up (the first included): a
    /// call that fails in an unknown way (timeout, error, participant
    /// down) is retried until then. A business failure is never retried.
    #[prost(uint32, tag = "7")]
    pub max_attempts: u32,
    /// How long one call may take before its outcome counts as unknown.
    #[prost(uint64, tag = "8")]
    pub timeout_ms: u64,
    /// Wait before the second call; doubled after each further failure.
    #[prost(uint64, tag = "9")]
    pub initial_backoff_ms: u64,
    /// Longest wait between two calls (actions and compensations).
    #[prost(uint64, tag = "10")]
    pub max_backoff_ms: u64,
}

impl BranchDef {
    /// A branch with the default retry policy and timeout, waiting for
    /// nothing (see [`SagaDef::sequential`]).
    pub fn new(name: &str, service: &str, action: &str, compensation: &str) -> BranchDef {
        BranchDef {
            name: name.into(),
            service: service.into(),
            action: action.into(),
            compensation: compensation.into(),
            payload: Bytes::new(),
            after: Vec::new(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            initial_backoff_ms: DEFAULT_INITIAL_BACKOFF_MS,
            max_backoff_ms: DEFAULT_MAX_BACKOFF_MS,
        }
    }

    /// Wait before call number `failures + 1` after `failures` unknown or
    /// failed calls: the initial backoff, doubling, at most the maximum.
    pub fn backoff_ms(&self, failures: u32) -> u64 {
        let doublings = failures.saturating_sub(1).min(40);
        self.initial_backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_backoff_ms.max(self.initial_backoff_ms))
    }
}

/// A saga's definition.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SagaDef {
    /// The branches, in an order they can run in.
    #[prost(message, repeated, tag = "1")]
    pub branches: Vec<BranchDef>,
    /// Once this long has passed since the start without every action
    /// done, the saga stops going forward and compensates; 0 for never.
    #[prost(uint64, tag = "2")]
    pub timeout_ms: u64,
}

impl SagaDef {
    /// A saga whose branches run one after the other, in the given order.
    pub fn sequential(mut branches: Vec<BranchDef>) -> SagaDef {
        for (i, b) in branches.iter_mut().enumerate() {
            b.after = match i {
                0 => Vec::new(),
                _ => vec![(i - 1) as u32],
            };
        }
        SagaDef {
            branches,
            timeout_ms: 0,
        }
    }

    /// Checks everything the state machine relies on; the error names the
    /// first field that is wrong (`branches[2].after`).
    pub fn validate(&self) -> Result<()> {
        if self.branches.is_empty() || self.branches.len() > MAX_BRANCHES {
            return Err(invalid(
                "branches",
                format!(
                    "a saga has 1 to {MAX_BRANCHES} branches, not {}",
                    self.branches.len()
                ),
            ));
        }
        if self.timeout_ms > MAX_DURATION_MS {
            return Err(invalid(
                "timeout_ms",
                format!("at most {MAX_DURATION_MS} (a day), or 0 for none"),
            ));
        }
        let size = prost::Message::encoded_len(self);
        if size > MAX_DEFINITION_BYTES {
            return Err(invalid(
                "",
                format!("{size} bytes encoded; at most {MAX_DEFINITION_BYTES} (payloads included)"),
            ));
        }
        for (i, b) in self.branches.iter().enumerate() {
            let field = |f: &str| format!("branches[{i}].{f}");
            for (f, v, required) in [
                ("name", &b.name, true),
                ("service", &b.service, true),
                ("action", &b.action, true),
                ("compensation", &b.compensation, false),
            ] {
                if required && v.is_empty() {
                    return Err(invalid(&field(f), "must not be empty".into()));
                }
                if v.len() > MAX_NAME_LEN {
                    return Err(invalid(
                        &field(f),
                        format!("at most {MAX_NAME_LEN} bytes, not {}", v.len()),
                    ));
                }
                if v.chars().any(char::is_control) {
                    return Err(invalid(&field(f), "contains a control character".into()));
                }
            }
            if self.branches[..i].iter().any(|o| o.name == b.name) {
                return Err(invalid(
                    &field("name"),
                    format!("\"{}\" names two branches", b.name),
                ));
            }
            if b.payload.len() > MAX_PAYLOAD {
                return Err(invalid(
                    &field("payload"),
                    format!("at most {MAX_PAYLOAD} bytes, not {}", b.payload.len()),
                ));
            }
            for (k, &a) in b.after.iter().enumerate() {
                if a as usize >= i {
                    return Err(invalid(
                        &field("after"),
                        format!(
                            "a branch waits only for branches before it (index < {i}), not {a}"
                        ),
                    ));
                }
                if b.after[..k].contains(&a) {
                    return Err(invalid(&field("after"), format!("{a} appears twice")));
                }
            }
            if b.max_attempts == 0 || b.max_attempts > MAX_ATTEMPTS {
                return Err(invalid(
                    &field("max_attempts"),
                    format!("1 to {MAX_ATTEMPTS}, not {}", b.max_attempts),
                ));
            }
            for (f, v) in [
                ("timeout_ms", b.timeout_ms),
                ("initial_backoff_ms", b.initial_backoff_ms),
                ("max_backoff_ms", b.max_backoff_ms),
            ] {
                if v == 0 || v > MAX_DURATION_MS {
                    return Err(invalid(
                        &field(f),
                        format!("1 to {MAX_DURATION_MS} (a day), not {v}"),
                    ));
                }
            }
            if b.max_backoff_ms < b.initial_backoff_ms {
                return Err(invalid(
                    &field("max_backoff_ms"),
                    format!(
                        "{} is less than initial_backoff_ms {}",
                        b.max_backoff_ms, b.initial_backoff_ms
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn invalid(field: &str, reason: String) -> Error {
    Error::InvalidDefinition {
        field: field.into(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> SagaDef {
        SagaDef::sequential(vec![
            BranchDef::new("order", "orders", "create", "cancel"),
            BranchDef::new("stock", "cart", "reserve", "release"),
            BranchDef::new("pay", "payments", "charge", "refund"),
        ])
    }

    fn field_of(d: &SagaDef) -> String {
        match d.validate() {
            Err(Error::InvalidDefinition { field, .. }) => field,
            other => panic!("expected an invalid definition, got {other:?}"),
        }
    }

    #[test]
    fn a_sequential_saga_waits_for_the_branch_before() {
        let d = three();
        d.validate().expect("valid");
        let after: Vec<Vec<u32>> = d.branches.iter().map(|b| b.after.clone()).collect();
        assert_eq!(after, vec![vec![], vec![0], vec![1]]);
    }

    #[test]
    fn each_mistake_names_its_field() {
        let mut d = three();
        d.branches.clear();
        assert_eq!(field_of(&d), "branches");

        let mut d = three();
        d.branches[1].service.clear();
        assert_eq!(field_of(&d), "branches[1].service");

        let mut d = three();
        d.branches[2].name = "order".into();
        assert_eq!(field_of(&d), "branches[2].name");

        let mut d = three();
        d.branches[1].after = vec![1];
        assert_eq!(field_of(&d), "branches[1].after");

        let mut d = three();
        d.branches[2].after = vec![0, 0];
        assert_eq!(field_of(&d), "branches[2].after");

        let mut d = three();
        d.branches[0].max_attempts = 0;
        assert_eq!(field_of(&d), "branches[0].max_attempts");

        let mut d = three();
        d.branches[0].max_backoff_ms = 1;
        assert_eq!(field_of(&d), "branches[0].max_backoff_ms");

        let mut d = three();
        d.branches[0].timeout_ms = 0;
        assert_eq!(field_of(&d), "branches[0].timeout_ms");

        let mut d = three();
        d.timeout_ms = MAX_DURATION_MS + 1;
        assert_eq!(field_of(&d), "timeout_ms");

        let mut d = three();
        d.branches[1].action = "a\nb".into();
        assert_eq!(field_of(&d), "branches[1].action");

        let mut d = three();
        d.branches[2].compensation.clear();
        d.validate().expect("a branch may have nothing to undo");

        let mut d = three();
        d.branches[0].payload = vec![0; MAX_PAYLOAD + 1].into();
        assert_eq!(field_of(&d), "branches[0].payload");

        let mut d = SagaDef::sequential(
            (0..MAX_BRANCHES)
                .map(|i| {
                    let mut b = BranchDef::new(&format!("b{i}"), "s", "do", "undo");
                    b.payload = vec![0; MAX_PAYLOAD].into();
                    b
                })
                .collect(),
        );
        assert_eq!(field_of(&d), "", "the whole definition is too large");
        d.branches.truncate(7);
        d.validate().expect("7 full payloads fit");
    }

    #[test]
    fn backoff_doubles_up_to_its_maximum() {
        let mut b = BranchDef::new("a", "s", "x", "y");
        b.initial_backoff_ms = 100;
        b.max_backoff_ms = 350;
        let waits: Vec<u64> = (1..=5).map(|f| b.backoff_ms(f)).collect();
        assert_eq!(waits, vec![100, 200, 350, 350, 350]);
        assert_eq!(b.backoff_ms(u32::MAX), 350);
    }
}
