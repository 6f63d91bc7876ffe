//! The example services of Tandem's demo, written the way we want users to
//! write theirs: an order service that places orders in one local
//! transaction with their `OrderPlaced` message ([`order`]), a cart service
//! that consumes them idempotently and reserves stock ([`cart`]), and a
//! payments service that charges and refunds as a saga's participant
//! ([`payments`]); each keeps its tables in its own SQLite database
//! ([`db`]), shared with its sidecar. [`process`] starts and stops them,
//! and Tandem's own processes, as real child processes.

pub mod cart;
pub mod db;
pub mod order;
pub mod payments;
pub mod process;
