//! Running the coordinator: serve gRPC (with the standard health service)
//! until the shutdown signal, over one of two stores.
//!
//! Embedded: open the logs under the data folder, serve, run retention on
//! its schedule, and shut down in order: stop accepting, end consumer
//! sessions (committing what they acknowledged), finish in-flight appends,
//! close the logs. A failed write or fsync stops the process.
//!
//! PostgreSQL: any number of replicas share one database and take turns
//! through the lease row [`LEASE_NAME`]. A replica connects (with backoff),
//! takes the lease when it is free or expired, opens the logs under it
//! (recovering the state its predecessor left: open transactions are
//! checked back, consumers resume from committed offsets), and serves while
//! it keeps renewing the lease. Until then, and again after it loses the
//! lease, cannot renew it in time, or a write fails, it reports
//! NOT_SERVING for the coordinator service and refuses requests as
//! UNAVAILABLE naming the holder, so clients go there; then it tries again.
//! The server's overall health (service name "") says whether the replica
//! reaches the database, which is what readiness should check: a standby
//! that does is useful (it sends clients to the holder and is ready to take
//! over), and marking standbys unready would leave a disruption budget
//! nothing to allow. The lease's epoch fences every
//! write: a replica that was paused past its lease cannot write a row after
//! its successor took over.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_proto::coordinator::coordinator_server::CoordinatorServer;
use tandem_storage::{EmbeddedLog, LogConfig, PgStore, StoreLog};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthReporter;

use crate::broker::Broker;
use crate::config::{Config, Store};
use crate::error::{Error, Result};
use crate::service::{CoordinatorService, Role, Validity};

/// Largest gRPC request or response accepted.
pub const MAX_REQUEST_BYTES: usize = 64 << 20;

/// The lease row replicas on one PostgreSQL database take turns on.
pub const LEASE_NAME: &str = "coordinator";

type Service = CoordinatorServer<CoordinatorService<StoreLog>>;

/// A coordinator ready to serve.
pub struct Coordinator {
    config: Config,
    embedded: Option<Embedded>,
}

/// The embedded store, opened.
struct Embedded {
    data: EmbeddedLog,
    internal: EmbeddedLog,
    broker: Arc<Broker<StoreLog>>,
}

/// Settings of the internal state logs, from those of the topics.
fn internal_config(config: &Config) -> LogConfig {
    LogConfig {
        segment_bytes: 4 << 20,
        retention: Default::default(),
        fsync: config.internal_fsync,
        relaxed_sync_within: Some(config.relaxed_sync),
        ..config.log.clone()
    }
}

async fn open_broker(
    config: &Config,
    data: StoreLog,
    internal: StoreLog,
) -> Result<Arc<Broker<StoreLog>>> {
    Ok(Arc::new(
        Broker::open(
            data,
            internal,
            config.revoke_timeout,
            config.publish_dedup_window,
            config.offsets_retention,
            config.saga_retention,
            config.txn.clone(),
        )
        .await?,
    ))
}

impl Coordinator {
    /// Opens (recovering) the logs under `config.data_dir` for the embedded
    /// store; with PostgreSQL, nothing is opened until [`serve`](Self::serve)
    /// holds the lease.
    pub async fn open(config: Config) -> Result<Coordinator> {
        let embedded = match config.store {
            Store::Embedded => {
                let data =
                    EmbeddedLog::open(config.data_dir.join("topics"), config.log.clone()).await?;
                let internal =
                    EmbeddedLog::open(config.data_dir.join("internal"), internal_config(&config))
                        .await?;
                let broker = open_broker(
                    &config,
                    StoreLog::Embedded(data.clone()),
                    StoreLog::Embedded(internal.clone()),
                )
                .await?;
                Some(Embedded {
                    data,
                    internal,
                    broker,
                })
            }
            Store::Postgres { .. } => None,
        };
        Ok(Coordinator { config, embedded })
    }

    /// Serves on `listener` until `shutdown` resolves, then shuts down.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let local = listener
            .local_addr()
            .map_err(|e| Error::Serve(e.to_string()))?;
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_not_serving::<Service>().await;
        if matches!(self.config.store, Store::Postgres { .. }) {
            reaches_store(&health, false).await;
        }
        let (role, role_rx) = watch::channel(Role::Standby { owner: None });
        let service = CoordinatorServer::new(CoordinatorService::with_role(
            role_rx,
            self.config.max_message_bytes,
            self.config.session_timeout,
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_REQUEST_BYTES);
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            Server::builder()
                .add_service(health_service)
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = server_stopped.await;
                }),
        );
        let ended = match self.embedded {
            Some(e) => serve_embedded(&self.config, e, &role, &health, shutdown).await,
            None => {
                let Store::Postgres { url } = &self.config.store else {
                    unreachable!("only the embedded store is opened before serving");
                };
                let advertise = self
                    .config
                    .replication
                    .advertise
                    .clone()
                    .unwrap_or_else(|| local.to_string());
                let replica = Replica {
                    config: &self.config,
                    url,
                    advertise,
                    role: &role,
                    health: &health,
                };
                replica.run(shutdown).await
            }
        };
        if let Err(e) = ended {
            server.abort();
            return Err(e);
        }
        let _ = stop_server.send(());
        let served = server
            .await
            .map_err(|e| Error::Serve(e.to_string()))?
            .map_err(|e| Error::Serve(e.to_string()));
        tracing::info!("stopped");
        served
    }
}

/// Serves the embedded store until `shutdown`; a failed write or fsync of
/// either log ends it at once with the failure (no graceful path, which
/// would write to the logs: what the failure left on disk is unknown, and
/// a restart recovers from what was synced).
async fn serve_embedded(
    config: &Config,
    e: Embedded,
    role: &watch::Sender<Role<StoreLog>>,
    health: &HealthReporter,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let retention =
        StoreLog::Embedded(e.data.clone()).spawn_retention(config.retention_schedule.clone());
    role.send_replace(Role::Active(e.broker.clone(), None));
    health.set_serving::<Service>().await;
    let (mut a, mut b, mut c) = (
        e.data.failed(),
        e.internal.failed(),
        e.broker.sagas.failed(),
    );
    tokio::select! {
        () = shutdown => {
            tracing::info!("shutting down");
            health.set_not_serving::<Service>().await;
            e.broker.shutdown().await;
            retention.abort();
            e.data.close().await;
            e.internal.close().await;
            Ok(())
        }
        cause = first_failure(&mut a, &mut b, &mut c) => {
            health.set_not_serving::<Service>().await;
            tracing::error!(%cause, "storage failed: stopping; restart to recover from disk");
            retention.abort();
            Err(Error::StorageFailed(cause))
        }
    }
}

/// One replica on a PostgreSQL store.
struct Replica<'a> {
    config: &'a Config,
    url: &'a str,
    advertise: String,
    role: &'a watch::Sender<Role<StoreLog>>,
    health: &'a HealthReporter,
}

/// Why a replica stopped serving.
enum Ended {
    Shutdown,
    Lost(String),
}

/// Longest pause between two attempts to reach the database.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Replica<'_> {
    async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = Duration::from_millis(100);
        let id = &self.config.replication.replica_id;
        tracing::info!(replica = %id, advertise = %self.advertise, "replica on PostgreSQL starting");
        loop {
            let attempt = async {
                let store = PgStore::connect(self.url, Duration::from_secs(5)).await?;
                let lease = self.take_lease(&store).await?;
                Ok::<_, Error>((store, lease))
            };
            let (store, (lease, taken_at)) = tokio::select! {
                () = &mut shutdown => return Ok(()),
                r = attempt => match r {
                    Ok(v) => v,
                    Err(e) => {
                        reaches_store(self.health, false).await;
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot reach PostgreSQL or take the lease");
                        tokio::select! {
                            () = &mut shutdown => return Ok(()),
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                },
            };
            backoff = Duration::from_millis(100);
            match self
                .serve_lease(&store, &lease, taken_at, &mut shutdown)
                .await
            {
                Ok(Ended::Shutdown) => {
                    if let Err(e) = store.release(&lease).await {
                        tracing::warn!(error = %e, "could not release the lease; it expires on its own");
                    }
                    store.close().await;
                    return Ok(());
                }
                Ok(Ended::Lost(cause)) => {
                    tracing::error!(epoch = lease.epoch, %cause, "stopped serving: standing by");
                }
                Err(e) => {
                    tracing::error!(epoch = lease.epoch, error = %e, "could not open the logs under the lease: standing by");
                }
            }
            // Let a healthy replica have the lease first: this one may be
            // the reason it was lost (writes failing here), and would
            // otherwise take it straight back. Meanwhile clients are sent
            // to whoever takes it.
            let _ = store.release(&lease).await;
            tokio::select! {
                () = &mut shutdown => {
                    store.close().await;
                    return Ok(());
                }
                () = self.point_to_holder(&store, self.config.replication.lease) => {}
            }
            store.close().await;
        }
    }

    /// For `period`, keeps telling clients which replica holds the lease.
    async fn point_to_holder(&self, store: &PgStore, period: Duration) {
        let until = Instant::now() + period;
        while Instant::now() < until {
            let holder = store.holder(LEASE_NAME).await;
            reaches_store(self.health, holder.is_ok()).await;
            if let Ok(holder) = holder {
                let owner = holder
                    .filter(|h| h.expires_in > 0 && h.owner != self.config.replication.replica_id)
                    .map(|h| h.address);
                self.role.send_replace(Role::Standby { owner });
            }
            tokio::time::sleep((period / 6).max(Duration::from_millis(20))).await;
        }
    }

    /// Waits until this replica holds the lease, telling clients meanwhile
    /// who does; returns it with the moment before the statement that took
    /// it (its length counts from there for this replica).
    async fn take_lease(&self, store: &PgStore) -> Result<(tandem_storage::Lease, Instant)> {
        let r = &self.config.replication;
        let mut shown = None;
        loop {
            // Only a lease that looks free is taken (taking it locks the row
            // and waits for the holder's writes in flight).
            let holder = store
                .holder(LEASE_NAME)
                .await?
                .filter(|h| h.expires_in > 0 && h.owner != r.replica_id);
            reaches_store(self.health, true).await;
            if holder.is_none() {
                if shown.is_some() {
                    // The holder's lease ran out: nobody to send clients to.
                    self.role.send_replace(Role::Standby { owner: None });
                    shown = None;
                }
                let before = Instant::now();
                if let Some(lease) = store
                    .acquire(LEASE_NAME, &r.replica_id, &self.advertise, r.lease)
                    .await?
                {
                    return Ok((lease, before));
                }
                continue;
            }
            let owner = holder.as_ref().map(|h| h.address.clone());
            if owner != shown {
                tracing::info!(owner = ?owner, "another replica holds the lease: standing by");
                self.role.send_replace(Role::Standby {
                    owner: owner.clone(),
                });
                shown = owner;
            }
            // Try again when it would expire, but at least every third of
            // a lease.
            let wait = holder
                .map(|h| Duration::from_millis(h.expires_in.max(0) as u64 + 10))
                .unwrap_or_default()
                .min(r.lease / 3)
                .max(Duration::from_millis(20));
            tokio::time::sleep(wait).await;
        }
    }

    /// Opens the logs under `lease` (taken at `taken_at`) and serves until
    /// the shutdown, the loss of the lease, or a failed write. The lease is
    /// renewed from the start, recovery included.
    async fn serve_lease(
        &self,
        store: &PgStore,
        lease: &tandem_storage::Lease,
        taken_at: Instant,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Ended> {
        let started = Instant::now();
        let c = self.config;
        let ttl = c.replication.lease;
        let validity = Arc::new(Validity::new(taken_at + margin(ttl)));
        // A task of its own, so that recovery runs to its end (a recovery
        // dropped half way would leave its tasks behind) while the lease is
        // renewed; a loss meanwhile shows once it is done.
        let mut keeper = tokio::spawn({
            let (store, lease, validity) = (store.clone(), lease.clone(), validity.clone());
            async move { keep(&store, &lease, ttl, &validity).await }
        });
        let open = async {
            let data = store.open("topics", lease, c.log.clone()).await?;
            let internal = store.open("internal", lease, internal_config(c)).await?;
            let broker = open_broker(
                c,
                StoreLog::Postgres(data.clone()),
                StoreLog::Postgres(internal.clone()),
            )
            .await?;
            Ok::<_, Error>((data, internal, broker))
        };
        let opened = tokio::select! {
            opened = open => opened,
            () = shutdown.as_mut() => {
                keeper.abort();
                return Ok(Ended::Shutdown);
            }
        };
        let (data, internal, broker) = match opened {
            Ok(v) => v,
            Err(e) => {
                keeper.abort();
                return Err(e);
            }
        };
        let retention =
            StoreLog::Postgres(data.clone()).spawn_retention(c.retention_schedule.clone());
        self.role
            .send_replace(Role::Active(broker.clone(), Some(validity.clone())));
        reaches_store(self.health, true).await;
        self.health.set_serving::<Service>().await;
        tracing::info!(
            epoch = lease.epoch,
            recovery_ms = started.elapsed().as_millis() as u64,
            "holding the lease: serving"
        );
        let (mut a, mut b, mut c) = (data.failed(), internal.failed(), broker.sagas.failed());
        let ended = tokio::select! {
            () = shutdown.as_mut() => Ended::Shutdown,
            cause = first_failure(&mut a, &mut b, &mut c) => Ended::Lost(format!("a write failed: {cause}")),
            cause = &mut keeper => Ended::Lost(cause.unwrap_or_else(|e| format!("the lease keeper failed: {e}"))),
        };
        keeper.abort();
        self.health.set_not_serving::<Service>().await;
        if matches!(ended, Ended::Lost(_)) {
            // Until it is seen to reach the database again.
            reaches_store(self.health, false).await;
        }
        self.role.send_replace(Role::Standby { owner: None });
        retention.abort();
        if matches!(ended, Ended::Shutdown) {
            tracing::info!("shutting down");
        }
        // Ends consumer sessions and lets in-flight steps finish; after a
        // loss their writes are refused, which is what they must be.
        broker.shutdown().await;
        data.close().await;
        internal.close().await;
        Ok(ended)
    }
}

/// Sets the server's overall health (service "") to whether the replica
/// reaches its database.
async fn reaches_store(health: &HealthReporter, yes: bool) {
    let status = if yes {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
}

/// How long this replica counts on a lease of length `ttl` from the moment
/// before the statement that took or renewed it: a tenth less, for the
/// time the statement took to reach the server and clocks that run apart.
fn margin(ttl: Duration) -> Duration {
    ttl - ttl / 10
}

/// Renews `lease` every third of its length, moving `validity` on; resolves
/// with the reason once it is lost or could not be renewed before this
/// replica's count of it runs out.
async fn keep(
    store: &PgStore,
    lease: &tandem_storage::Lease,
    ttl: Duration,
    validity: &Validity,
) -> String {
    loop {
        tokio::time::sleep(ttl / 3).await;
        let sent = Instant::now();
        match tokio::time::timeout_at(validity.until(), store.renew(lease, ttl)).await {
            Ok(Ok(true)) => validity.extend(sent + margin(ttl)),
            Ok(Ok(false)) => return "another replica took the lease over".into(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not renew the lease; retrying");
                if Instant::now() >= validity.until() {
                    return "the lease ran out before it could be renewed".into();
                }
            }
            Err(_) => return "the lease ran out before it could be renewed".into(),
        }
    }
}

/// Resolves with the cause of the first failure a log or the saga driver
/// reports.
async fn first_failure(
    a: &mut watch::Receiver<Option<String>>,
    b: &mut watch::Receiver<Option<String>>,
    c: &mut watch::Receiver<Option<String>>,
) -> String {
    async fn one(r: &mut watch::Receiver<Option<String>>) -> String {
        let cause = r.wait_for(Option::is_some).await.map(|v| v.clone());
        match cause {
            Ok(v) => v.unwrap_or_default(),
            // The log is gone: never a failure.
            Err(_) => std::future::pending().await,
        }
    }
    tokio::select! {
        cause = one(a) => cause,
        cause = one(b) => cause,
        cause = one(c) => cause,
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
