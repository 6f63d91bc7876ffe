//! End-to-end pieces of Tandem: the test application the fault tests drive,
//! the fault campaign, a PostgreSQL server of their own, and the scenarios
//! of `tandem bench` ([`bench`]). The example services, and the handle on
//! real processes, are in `tandem-examples`; the fault tests themselves are
//! in `tests/`.

pub mod bench;
pub mod campaign;
pub mod postgres;
pub mod testapp;
