//! The Tandem sidecar, deployed next to every service.
//!
//! It gives the app one local gRPC endpoint (`tandem.sidecar.v1`) for
//! publishing, transactional messages and subscriptions; holds the
//! service's session to the coordinator and answers check-backs from the
//! app's database (`tandem_txn`, table mode) or the app's callback (callback
//! mode); and delivers subscribed messages to the app's `HandleMessage`
//! exactly once in effect through the `tandem_inbox` dedup table, in order
//! per key, with retries and a dead-letter topic. Its tables live in the
//! app's own database (SQLite or PostgreSQL) so they commit together with
//! the app's rows.

mod api;
mod barrier;
mod check;
mod config;
mod coordinators;
mod db;
mod delivery;
mod error;
mod gather;
mod handler;
mod metrics;
mod node;
mod server;
mod session;
mod subscription;
mod transact;

pub use config::{Config, Listen, SidecarArgs};
pub use db::{Admission, Admit, ClaimRequest, Db, InboxRow, TableState};
pub use delivery::{REDRIVE_GROUP_HEADER, REDRIVE_TOPIC_HEADER};
pub use error::{Error, Result};
pub use server::{run, run_process, serve, serve_with_metrics};
