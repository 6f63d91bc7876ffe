//! The `tandem` command: admin commands (topics, publish, consume, sagas) over the
//! coordinator API; the coordinator, the sidecar and the example services
//! themselves; and `tandem demo`, which runs them all as real processes, so
//! one binary can run and drive a whole Tandem.

mod audit;
#[cfg(feature = "bench")]
mod bench;
#[cfg(not(feature = "bench"))]
#[path = "no_bench.rs"]
mod bench;
mod cert;
mod clock;
mod consume;
mod demo;
mod health;
mod operate;
mod publish;
mod saga;
mod topic;

pub use audit::{AuditArgs, Problem, Report, audit, audit_report};
#[cfg(feature = "bench")]
pub use bench::Scenario;
pub use bench::{BenchArgs, bench};
pub use cert::{CertCommand, cert};
pub use consume::{ConsumeArgs, consume};
pub use demo::{DemoArgs, demo};
pub use health::{HealthArgs, health};
pub use operate::{DlqCommand, GroupCommand, ReadArgs, TxnCommand, dlq, group, read, txn};
pub use publish::{PublishArgs, publish};
pub use saga::{SagaCommand, saga};
pub use topic::{TopicCommand, topic};

use tandem_proto::coordinator::ListTopicsRequest;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

/// The certificate this process presents to coordinators, once set.
static TLS: std::sync::OnceLock<std::sync::Arc<tandem_runtime::tls::ClientTls>> =
    std::sync::OnceLock::new();

/// Makes every later [`connect`] of this process use mutual TLS with
/// `tls` (once: a second call is an error).
pub fn use_tls(tls: std::sync::Arc<tandem_runtime::tls::ClientTls>) -> anyhow::Result<()> {
    TLS.set(tls)
        .map_err(|_| anyhow::anyhow!("TLS is already configured"))
}

pub(crate) fn tls() -> Option<std::sync::Arc<tandem_runtime::tls::ClientTls>> {
    TLS.get().cloned()
}

/// The URL of the replica at `addr` (`host:port`), as a refusal names it.
pub(crate) fn replica_url(addr: &str) -> String {
    format!("{}://{addr}", tandem_runtime::tls::scheme(tls().is_some()))
}

/// How long [`connect`] keeps looking for a replica that serves (a lease
/// expiring and its successor recovering take a few seconds).
const FAILOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Connects to a coordinator replica that serves among `urls`
/// (comma-separated): replicas forward calls to the owner of their shard,
/// so any that answers will do; one that cannot be reached is skipped, and
/// one that refuses naming another sends this there. While none serves, it
/// tries again for up to 20 s.
pub async fn connect(urls: &str) -> anyhow::Result<CoordinatorClient<Channel>> {
    let configured: Vec<String> = urls.split(',').map(|u| u.trim().to_owned()).collect();
    for u in &configured {
        tandem_runtime::tls::check_scheme("--coordinator", u, tls().is_some())?;
    }
    let deadline = tokio::time::Instant::now() + FAILOVER_WAIT;
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        let err = match connect_round(&configured).await {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        if err.is::<NotPlaintext>() || tokio::time::Instant::now() + pause > deadline {
            return Err(err);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(1));
    }
}

/// A plaintext call reached a TLS port: trying again will not help.
#[derive(Debug)]
struct NotPlaintext(String);

impl std::fmt::Display for NotPlaintext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotPlaintext {}

async fn connect_round(configured: &[String]) -> anyhow::Result<CoordinatorClient<Channel>> {
    let mut queue: std::collections::VecDeque<String> = configured.iter().cloned().collect();
    let mut tried = Vec::new();
    let mut last = anyhow::anyhow!("no coordinator URL given");
    while let Some(url) = queue.pop_front() {
        if tried.contains(&url) {
            continue;
        }
        tried.push(url.clone());
        let endpoint = tandem_runtime::tls::endpoint(&url)?
            .connect_timeout(std::time::Duration::from_secs(3))
            .http2_keep_alive_interval(std::time::Duration::from_secs(2))
            .keep_alive_timeout(std::time::Duration::from_secs(3));
        let channel = tandem_runtime::tls::channel(endpoint, tls().as_ref()).await;
        let client = match channel.map(CoordinatorClient::new) {
            Ok(c) => c
                .max_decoding_message_size(tandem_coordinator::MAX_REQUEST_BYTES)
                .max_encoding_message_size(tandem_coordinator::MAX_REQUEST_BYTES),
            Err(e) => {
                last =
                    anyhow::Error::new(e).context(format!("cannot reach the coordinator at {url}"));
                continue;
            }
        };
        // A frozen replica answers nothing: not waited for long.
        let probe = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.clone().list_topics(ListTopicsRequest {}),
        )
        .await
        .unwrap_or_else(|_| Err(tonic::Status::unavailable("no answer within 5 s")));
        match probe {
            Ok(_) => return Ok(client),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                if let Some(owner) = s
                    .metadata()
                    .get(tandem_coordinator::OWNER_METADATA)
                    .and_then(|v| v.to_str().ok())
                {
                    queue.push_front(replica_url(owner));
                }
                last = anyhow::anyhow!("the coordinator at {url} does not serve: {}", s.message());
            }
            // A TLS port answering a plaintext HTTP/2 preface.
            // (hyper reports it as a protocol error, a broken transport or
            // a cancelled call, depending on when the TLS side hangs up;
            // a coordinator answers ListTopics with none of these.)
            Err(s)
                if url.starts_with("http://")
                    && matches!(
                        s.code(),
                        tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::Cancelled
                    )
                    && [
                        "h2 protocol error",
                        "transport error",
                        "operation was canceled",
                    ]
                    .iter()
                    .any(|m| s.message().contains(m)) =>
            {
                // (Not retried: it will not change.)
                return Err(NotPlaintext(format!(
                    "the coordinator at {url} does not speak plaintext gRPC (the connection broke: {}): if it serves TLS, use https:// with --tls-cert, --tls-key and --tls-ca",
                    s.message()
                ))
                .into());
            }
            // Any other answer comes from a replica that serves.
            Err(_) => return Ok(client),
        }
    }
    Err(last)
}

/// Turns a gRPC status into an error that reads well on a terminal.
pub(crate) fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// Bytes as JSON: a string if UTF-8, else `{"base64": "..."}`.
pub(crate) fn bytes_json(b: &[u8]) -> serde_json::Value {
    use base64::Engine;
    match std::str::from_utf8(b) {
        Ok(s) => serde_json::json!(s),
        Err(_) => {
            serde_json::json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) })
        }
    }
}
