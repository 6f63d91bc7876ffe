//! Saga definitions and the pure saga state machine: an ordered list of
//! branches, each with an action and a compensation, driven forward with
//! retries and compensated in reverse. No I/O lives here (no clock, no
//! socket, no disk): the coordinator drives it, performs its effects and
//! feeds back what happened.

mod definition;
mod error;
mod machine;

pub use definition::{
    BranchDef, DEFAULT_INITIAL_BACKOFF_MS, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_BACKOFF_MS,
    DEFAULT_TIMEOUT_MS, MAX_ATTEMPTS, MAX_BRANCHES, MAX_DEFINITION_BYTES, MAX_DURATION_MS,
    MAX_NAME_LEN, MAX_PAYLOAD, SagaDef,
};
pub use error::{Error, Result};
pub use machine::{
    BranchRecord, CALL_GRACE_MS, Call, Effect, Event, MAX_REASON, Op, OpRecord, OpStatus, Outcome,
    Saga, SagaRecord, SagaStatus, clip,
};
