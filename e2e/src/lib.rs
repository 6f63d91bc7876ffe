//! End-to-end pieces of Tandem: real processes for tests and the demo, the
//! test application the fault tests drive, and the scenarios of `tandem
//! bench` ([`bench`]). The example services are in `tandem-examples`; the
//! fault tests themselves are in `tests/`.

pub mod bench;
pub mod campaign;
pub mod postgres;
pub mod process;
pub mod testapp;
