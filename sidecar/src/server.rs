//! Running a sidecar: open the app's database and migrate Tandem's tables,
//! hold the coordinator session, resume saved subscriptions, serve the
//! sidecar API (with the gRPC health service), clean old rows on schedule,
//! and shut down in order.

use std::future::Future;
use std::sync::Arc;

use tandem_proto::sidecar::sidecar_server::SidecarServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::api::SidecarService;
use crate::config::{Config, Listen};
use crate::db::Db;
use crate::error::{Error, Result};
use crate::node::Node;
use crate::session;
use crate::subscription::{self, Subscriptions};

/// Runs a sidecar on `listener` until `shutdown` resolves.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    serve_with_metrics(config, listener, None, shutdown).await
}

/// [`serve`], and Prometheus metrics (`GET /metrics`) on `metrics` while
/// it serves.
pub async fn serve_with_metrics(
    config: Config,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    serve_when_ready(config, Bound::Tcp(listener), metrics, shutdown, || {}).await
}

/// The socket the app calls the sidecar on.
enum Bound {
    Tcp(TcpListener),
    Unix(tokio::net::UnixListener),
}

/// [`serve_with_metrics`], calling `ready` once the app's database is
/// reached and migrated, before it serves anything.
async fn serve_when_ready(
    config: Config,
    listener: Bound,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
    ready: impl FnOnce(),
) -> Result<()> {
    let db = Db::connect(&config.db).await?;
    db.migrate().await?;
    let node = Arc::new(Node::new(config, db)?);
    let (stop, stop_rx) = watch::channel(false);
    let session = tokio::spawn(session::run(node.clone(), stop_rx));
    let subscriptions = Arc::new(Subscriptions::default());
    for spec in node.db.subscriptions().await? {
        match subscription::decode(&spec) {
            Some(spec) => {
                tracing::info!(topic = %spec.topic, group = %spec.group, "resuming subscription");
                subscriptions.start(&node, spec, None).await;
            }
            None => tracing::error!("undecodable saved subscription skipped"),
        }
    }
    let n = node.clone();
    let cleanup = tokio::spawn(node.config.cleanup_schedule.clone().run(move || {
        let n = n.clone();
        async move {
            let before = std::time::SystemTime::now()
                .checked_sub(n.config.retention)
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as i64);
            match n.db.cleanup(before, crate::check::now_ms()).await {
                Ok(rows) => tracing::info!(
                    rows,
                    "old dedup rows, rollback markers and expired claims deleted"
                ),
                Err(e) => tracing::error!(error = %e, "cleanup failed"),
            }
        }
    }));
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SidecarServer<SidecarService>>().await;
    ready();
    let service = SidecarServer::new(SidecarService {
        node: node.clone(),
        subscriptions: subscriptions.clone(),
    })
    .max_decoding_message_size(tandem_runtime::MAX_REQUEST_BYTES)
    .max_encoding_message_size(tandem_runtime::MAX_REQUEST_BYTES);
    let router = tandem_proto::with_reflection(
        Server::builder()
            .add_service(health_service)
            .add_service(service),
        &[tandem_proto::sidecar::sidecar_server::SERVICE_NAME],
    )
    .map_err(|e| Error::Serve(format!("gRPC reflection: {e}")))?;
    let metrics = metrics.map(|listener| {
        let node = node.clone();
        tokio::spawn(tandem_runtime::metrics::serve(listener, move || {
            let text = crate::metrics::render(&node.counters.snapshot());
            async move { text }
        }))
    });
    let subs = subscriptions.clone();
    let stopping = async move {
        shutdown.await;
        tracing::info!("shutting down");
        health
            .set_not_serving::<SidecarServer<SidecarService>>()
            .await;
        subs.stop_all().await;
    };
    let served = match listener {
        Bound::Tcp(listener) => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, stopping)
                .await
        }
        Bound::Unix(listener) => {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            router
                .serve_with_incoming_shutdown(incoming, stopping)
                .await
        }
    };
    // Calls already in the app run to their end and record their dedup row
    // (at most the handler timeout): exiting first would leave effects
    // without records, handled again by whoever gets the messages next.
    let within = node.config.handler_timeout + std::time::Duration::from_secs(2);
    if !node.in_flight.idle_within(within).await {
        tracing::warn!(
            "handler calls still running at shutdown; their messages will be delivered again"
        );
    }
    let _ = stop.send(true);
    let _ = session.await;
    cleanup.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    tracing::info!("stopped");
    served.map_err(|e| Error::Serve(e.to_string()))
}

/// A sidecar process's life: loads the settings from `args` and the
/// environment, logs as their `log` and `log_format` say, starts the async
/// runtime with their `worker_threads`, and serves until SIGTERM or SIGINT. Errors are
/// printed after `program: `; bad settings exit with 2.
pub fn run_process(program: &str, args: &crate::SidecarArgs) -> std::process::ExitCode {
    use std::process::ExitCode;
    let config = match Config::load(args, std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{program}: {e}");
            return ExitCode::from(2);
        }
    };
    let mut telemetry = match tandem_runtime::init_telemetry(
        &config.log_filter,
        config.log_format,
        config.otlp_endpoint.as_deref(),
        &format!("{}-sidecar", config.service),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{program}: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match config.runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async {
        match run(config, tandem_runtime::shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{program}: {e}");
                ExitCode::FAILURE
            }
        }
    });
    telemetry.shutdown(); // the spans still buffered go out
    code
}

/// Binds `config.listen`, says where it listens on standard output, and
/// serves until `shutdown`.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    let (listener, local) = match &config.listen {
        Listen::Tcp(addr) => {
            let addr = *addr;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { addr, source })?;
            let local = listener
                .local_addr()
                .map_err(|source| Error::Bind { addr, source })?;
            (Bound::Tcp(listener), Listen::Tcp(local).to_string())
        }
        Listen::Unix(path) => {
            let listener =
                tandem_runtime::unix::bind(path).map_err(|source| Error::BindSocket {
                    path: path.clone(),
                    source,
                })?;
            (Bound::Unix(listener), config.listen.to_string())
        }
    };
    let metrics = tandem_runtime::metrics::bind(config.metrics_listen)
        .await
        .map_err(|(addr, source)| Error::Bind { addr, source })?;
    // Said once the database is reached: a process that says it listens
    // serves (its health is SERVING from then on).
    let metrics_at = metrics.as_ref().map(|(_, at)| *at);
    let (service, coordinators) = (config.service.clone(), config.coordinator.join(","));
    let ready = move || {
        println!("tandem-sidecar listening on {local}");
        tracing::info!(%local, %service, coordinator = %coordinators, "listening");
        if let Some(at) = metrics_at {
            println!("tandem-sidecar metrics on http://{at}/metrics");
        }
    };
    serve_when_ready(config, listener, metrics.map(|(l, _)| l), shutdown, ready).await
}
