//! End-to-end pieces of Tandem: the order/cart example services (written
//! the way we want users to write theirs), real processes for tests and the
//! demo, the test application the fault tests drive, and the scenarios of
//! `tandem bench` ([`bench`]). The fault tests themselves are in `tests/`.

pub mod bench;
pub mod campaign;
pub mod cart;
pub mod db;
pub mod order;
pub mod payments;
pub mod postgres;
pub mod process;
pub mod testapp;
