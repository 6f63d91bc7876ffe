//! End-to-end pieces of Tandem: the order/cart example services (written
//! the way we want users to write theirs), real processes for tests and the
//! demo, and the test application the fault tests drive. The fault tests
//! themselves are in `tests/`, the benchmark drivers in `benches/`.

pub mod bench;
pub mod campaign;
pub mod cart;
pub mod db;
pub mod order;
pub mod postgres;
pub mod process;
pub mod testapp;
