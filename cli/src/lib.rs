//! The `tandem` command: admin commands (topics, publish, consume) over the
//! coordinator API; the coordinator, the sidecar and the example services
//! themselves; and `tandem demo`, which runs them all as real processes, so
//! one binary can run and drive a whole Tandem.

mod consume;
mod demo;
mod publish;
mod topic;

pub use consume::{ConsumeArgs, consume};
pub use demo::{DemoArgs, demo};
pub use publish::{PublishArgs, publish};
pub use topic::{TopicCommand, topic};

use anyhow::Context;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

/// Connects to the coordinator at `url`.
pub async fn connect(url: &str) -> anyhow::Result<CoordinatorClient<Channel>> {
    let client = CoordinatorClient::connect(url.to_owned())
        .await
        .with_context(|| format!("cannot reach the coordinator at {url}"))?;
    Ok(client
        .max_decoding_message_size(tandem_coordinator::MAX_REQUEST_BYTES)
        .max_encoding_message_size(tandem_coordinator::MAX_REQUEST_BYTES))
}

/// Turns a gRPC status into an error that reads well on a terminal.
pub(crate) fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}
