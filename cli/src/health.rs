//! `tandem health`: asks a Tandem process's standard gRPC health service,
//! for probes (Kubernetes' own gRPC probe speaks no TLS) and scripts.

use std::io::Write;
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// `tandem health` arguments.
#[derive(clap::Args)]
pub struct HealthArgs {
    /// The process: http://HOST:PORT, https://HOST:PORT (with --tls-cert,
    /// --tls-key, --tls-ca), or unix:PATH [default: --coordinator].
    pub target: Option<String>,
    /// The service whose health to ask; empty: the server's overall
    /// (a coordinator replica: reaches its store; a sidecar: serves).
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up after this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// Prints the status; true when SERVING.
pub async fn health(target: &str, args: &HealthArgs, out: &mut impl Write) -> anyhow::Result<bool> {
    let channel = match tandem_runtime::unix::socket_path(target) {
        Some(path) => tandem_runtime::unix::lazy_channel(path),
        None => {
            let tls = if target.starts_with("https://") {
                Some(crate::tls().ok_or_else(|| {
                    anyhow::anyhow!("{target} is https://: give --tls-cert, --tls-key and --tls-ca")
                })?)
            } else {
                None
            };
            let endpoint = tandem_runtime::tls::endpoint(target)
                .map_err(|e| anyhow::anyhow!("{target:?}: {e}"))?
                .connect_timeout(Duration::from_millis(args.timeout_ms));
            tandem_runtime::tls::lazy_channel(endpoint, tls.as_ref())
        }
    };
    let asked = tokio::time::timeout(
        Duration::from_millis(args.timeout_ms),
        HealthClient::new(channel).check(HealthCheckRequest {
            service: args.service.clone(),
        }),
    )
    .await
    .map_err(|_| anyhow::anyhow!("{target}: no answer within {} ms", args.timeout_ms))?
    .map_err(|s| anyhow::anyhow!("{target}: {}", s.message()))?;
    let status = asked.into_inner().status();
    writeln!(out, "{}", status.as_str_name())?;
    Ok(status == ServingStatus::Serving)
}
