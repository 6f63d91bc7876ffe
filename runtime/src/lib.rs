//! Process plumbing shared by the coordinator and the sidecar: settings
//! layering, logging and traces, signals, request limits and id checks, so
//! that the sidecar does not depend on the coordinator.

mod ids;
pub mod logging;
pub mod metrics;
pub mod settings;
mod signal;
pub mod telemetry;
pub mod tls;
pub mod unix;

pub use ids::{InvalidField, MAX_ID_LEN, check_group, check_id, fresh_id};
pub use logging::{LogFormat, init_tracing};
pub use settings::ConfigError;
pub use signal::shutdown_signal;
pub use telemetry::{Telemetry, TelemetryError, init_telemetry};

/// Largest gRPC message either side accepts (a `Transact` or `Publish`
/// call of many messages).
pub const MAX_REQUEST_BYTES: usize = 64 << 20;
