//! Saga definitions and the pure saga state machine: an ordered list of
//! branches, each with an action and a compensation, driven forward and
//! compensated in reverse. No I/O lives here; the coordinator drives it.
