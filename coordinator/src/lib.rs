//! The Tandem coordinator: topics and publishing, consumer groups with
//! credit-based flow control, and transactional messages (half messages,
//! commit/rollback, check-back), served over gRPC (`tandem.coordinator.v1`).
//!
//! [`Broker`] is the coordinator without its gRPC skin, generic over the
//! [`Log`](tandem_storage::Log) it stores into; [`Coordinator`] opens the
//! embedded logs and serves it; [`Config`] layers the settings. The
//! binaries (`tandem-coordinator`, `tandem coordinator`) only parse flags
//! and call [`run`].

pub mod authz;
mod broker;
mod claims;
mod cluster;
mod config;
mod consumer;
mod error;
pub use tandem_storage::failpoint;
mod group;
mod inspect;
mod metrics;
mod offsets;
mod partitioner;
mod published;
mod replica;
mod saga;
mod saga_wire;
mod server;
mod service;
mod session;
pub mod shards;
mod statelog;
mod topics;
mod transactions;
mod txn_core;
mod txn_table;
mod wire;

pub use broker::{
    Broker, GroupDescription, HalfMessage, MemberDescription, Outgoing, PartitionDescription,
    Position,
};
pub use config::{
    Config, CoordinatorArgs, DEFAULT_SHARDS, FinalAction, Replication, Store, TxnSettings,
};
pub use consumer::{Outbound, StartFrom, Subscription};
pub use error::{Error, Result};
pub use server::{Coordinator, LEASE_NAME, MAX_REQUEST_BYTES, run};
pub use service::{
    CoordinatorService, MAX_CONTEXT_BYTES, OWNER_METADATA, Role, SIDECAR_SESSION_TIMEOUT, Validity,
};
pub use tandem_runtime::{
    ConfigError, LogFormat, MAX_ID_LEN, Telemetry, check_group, check_id, init_telemetry,
    init_tracing, logging, settings, shutdown_signal,
};
pub use topics::{MAX_PARTITIONS, TopicMeta};
