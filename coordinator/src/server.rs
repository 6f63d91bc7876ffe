//! Running the coordinator: open the logs, serve gRPC (with the standard
//! health service) until the shutdown signal, run retention on its schedule,
//! and shut down in order: stop accepting, end consumer sessions (committing
//! what they acknowledged), finish in-flight appends, close the logs.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tandem_proto::coordinator::coordinator_server::CoordinatorServer;
use tandem_storage::{EmbeddedLog, LogConfig};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::broker::Broker;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::service::CoordinatorService;

/// Largest gRPC request or response accepted.
pub const MAX_REQUEST_BYTES: usize = 64 << 20;

/// A coordinator with its logs open, ready to serve.
pub struct Coordinator {
    config: Config,
    data: EmbeddedLog,
    internal: EmbeddedLog,
    broker: Arc<Broker<EmbeddedLog>>,
}

impl Coordinator {
    /// Opens (recovering) the logs under `config.data_dir`.
    pub async fn open(config: Config) -> Result<Coordinator> {
        let data = EmbeddedLog::open(config.data_dir.join("topics"), config.log.clone()).await?;
        let internal_config = LogConfig {
            segment_bytes: 4 << 20,
            retention: Default::default(),
            fsync: config.internal_fsync,
            relaxed_sync_within: Some(config.relaxed_sync),
            ..config.log.clone()
        };
        let internal = EmbeddedLog::open(config.data_dir.join("internal"), internal_config).await?;
        let broker = Arc::new(
            Broker::open(
                data.clone(),
                internal.clone(),
                config.revoke_timeout,
                config.publish_dedup_window,
                config.offsets_retention,
                config.txn.clone(),
            )
            .await?,
        );
        Ok(Coordinator {
            config,
            data,
            internal,
            broker,
        })
    }

    /// The broker behind the service.
    pub fn broker(&self) -> &Arc<Broker<EmbeddedLog>> {
        &self.broker
    }

    /// Serves on `listener` until `shutdown` resolves, then shuts down.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let retention = self
            .data
            .spawn_retention(self.config.retention_schedule.clone());
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<CoordinatorServer<CoordinatorService<EmbeddedLog>>>()
            .await;
        let service = CoordinatorServer::new(CoordinatorService::new(
            self.broker.clone(),
            self.config.max_message_bytes,
            self.config.session_timeout,
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_REQUEST_BYTES);
        let broker = self.broker.clone();
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let not_serving = health.clone();
        let server = Server::builder()
            .add_service(health_service)
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async move {
                shutdown.await;
                tracing::info!("shutting down");
                health
                    .set_not_serving::<CoordinatorServer<CoordinatorService<EmbeddedLog>>>()
                    .await;
                broker.shutdown().await;
            });
        // A failed write or fsync of any log stops the process at once,
        // without the graceful path (which would write to the logs): what
        // the failure left on disk is unknown, and a restart recovers from
        // what was synced.
        let (mut topics_failed, mut internal_failed) = (self.data.failed(), self.internal.failed());
        let served = tokio::select! {
            served = server => served,
            cause = first_failure(&mut topics_failed, &mut internal_failed) => {
                not_serving
                    .set_not_serving::<CoordinatorServer<CoordinatorService<EmbeddedLog>>>()
                    .await;
                tracing::error!(%cause, "storage failed: stopping; restart to recover from disk");
                retention.abort();
                return Err(Error::StorageFailed(cause));
            }
        };
        retention.abort();
        self.data.close().await;
        self.internal.close().await;
        tracing::info!("stopped");
        served.map_err(|e| Error::Serve(e.to_string()))
    }
}

/// Resolves with the cause of the first failure either log reports.
async fn first_failure(
    a: &mut tokio::sync::watch::Receiver<Option<String>>,
    b: &mut tokio::sync::watch::Receiver<Option<String>>,
) -> String {
    async fn one(r: &mut tokio::sync::watch::Receiver<Option<String>>) -> String {
        let cause = r.wait_for(Option::is_some).await.map(|v| v.clone());
        match cause {
            Ok(v) => v.unwrap_or_default(),
            // The log is gone: never a failure.
            Err(_) => std::future::pending().await,
        }
    }
    tokio::select! {
        c = one(a) => c,
        c = one(b) => c,
    }
}

/// Binds `config.listen`, says where it listens on standard output (the
/// port may have been 0), and serves until `shutdown`.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
    let addr: SocketAddr = listener.local_addr().map_err(|source| Error::Bind {
        addr: config.listen,
        source,
    })?;
    let coordinator = Coordinator::open(config).await?;
    println!("tandem-coordinator listening on {addr}");
    tracing::info!(%addr, "listening");
    coordinator.serve(listener, shutdown).await
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Sets up logging to standard error with `filter` (`RUST_LOG` wins).
pub fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
