//! End-to-end pieces of Tandem: real processes for tests and the demo, and
//! the test application the fault tests drive. The fault tests themselves
//! are in `tests/`, the benchmark driver in `benches/`.

pub mod process;
pub mod testapp;
