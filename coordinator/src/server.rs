//! Running the coordinator: serve gRPC (with the standard health service)
//! until the shutdown signal, over one of two stores.
//!
//! Embedded: open the logs under the data folder, serve, run retention on
//! its schedule, and shut down in order: stop accepting, end consumer
//! sessions (committing what they acknowledged), finish in-flight appends,
//! close the logs. A failed write or fsync stops the process.
//!
//! PostgreSQL: see `replica.rs`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tandem_proto::coordinator::coordinator_server::CoordinatorServer;
use tandem_runtime::tls::{ClientTls, ServerTls};
use tandem_storage::{EmbeddedLog, LogConfig, StoreLog};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthReporter;

use crate::broker::{Broker, Limits, Place};
use crate::cluster::Cluster;
use crate::config::{Config, Store};
use crate::error::{Error, Result};
use crate::replica::Replica;
use crate::service::{CoordinatorService, Role};
use crate::session::Sessions;

pub use tandem_runtime::MAX_REQUEST_BYTES;

/// The lease row of a store of one shard (with several, shard `k`'s is
/// `coordinator/<k>`).
pub const LEASE_NAME: &str = "coordinator";

pub(crate) type Service = CoordinatorServer<CoordinatorService<StoreLog>>;

/// A coordinator ready to serve.
pub struct Coordinator {
    config: Config,
    embedded: Option<Embedded>,
    /// Sidecar sessions, shared by every shard this replica serves.
    sessions: Arc<Sessions>,
    /// Where to serve Prometheus metrics while serving, if anywhere.
    metrics: Option<TcpListener>,
    /// Mutual TLS on the gRPC port, and to the other replicas.
    tls: Option<(Arc<ServerTls>, Arc<ClientTls>)>,
}

/// The embedded store, opened.
struct Embedded {
    data: EmbeddedLog,
    internal: EmbeddedLog,
    broker: Arc<Broker<StoreLog>>,
}

/// Settings of the internal state logs, from those of the topics.
pub(crate) fn internal_config(config: &Config) -> LogConfig {
    LogConfig {
        segment_bytes: 4 << 20,
        retention: Default::default(),
        fsync: config.internal_fsync,
        relaxed_sync_within: Some(config.relaxed_sync),
        ..config.log.clone()
    }
}

pub(crate) async fn open_broker(
    config: &Config,
    data: StoreLog,
    internal: StoreLog,
    place: Place,
) -> Result<Arc<Broker<StoreLog>>> {
    let limits = Limits {
        revoke_timeout: config.revoke_timeout,
        dedup_window: config.publish_dedup_window,
        offsets_retention: config.offsets_retention,
        saga_retention: config.saga_retention,
    };
    Ok(Arc::new(
        Broker::open(data, internal, limits, config.txn.clone(), place).await?,
    ))
}

/// Shards of the store `config` names.
fn shard_count(config: &Config) -> u32 {
    match config.store {
        Store::Embedded => 1,
        Store::Postgres { .. } => config.replication.shards,
    }
}

impl Coordinator {
    /// Opens (recovering) the logs under `config.data_dir` for the embedded
    /// store; with PostgreSQL, nothing is opened until [`serve`](Self::serve)
    /// holds a shard's lease.
    pub async fn open(config: Config) -> Result<Coordinator> {
        let tls = match &config.tls {
            Some(files) => {
                let server = ServerTls::new(files.clone())?;
                // Replicas recognise each other by this identity.
                let me = server.identity();
                if me.name == "default" {
                    return Err(Error::FailedPrecondition(format!(
                        "the coordinator's certificate names {me}: a default service account, which other pods share; give the coordinator a service account of its own"
                    )));
                }
                let peers = ClientTls::new(files.clone(), Some(me.id.clone()))?;
                tracing::info!(identity = %me, "serving mutual TLS");
                if config.authorization.topics_open() {
                    tracing::warn!(
                        "no [[authorization.grant]]: every authenticated caller may publish to and consume every topic"
                    );
                }
                Some((server, peers))
            }
            None => {
                if config.authorization.configured() {
                    return Err(Error::FailedPrecondition(
                        "[authorization] needs TLS: without tls_cert, tls_key and tls_ca nobody's identity is known".into(),
                    ));
                }
                tracing::warn!(
                    listen = %config.listen,
                    "serving plaintext gRPC WITHOUT TLS: any client that reaches this port can act for any service; set tls_cert, tls_key and tls_ca (README: Securing Tandem)"
                );
                None
            }
        };
        let sessions = Arc::new(Sessions::default());
        let embedded = match config.store {
            Store::Embedded => {
                // one journal and one writer for both, so that one fdatasync
                // covers a transaction's state and its messages
                let mut logs = EmbeddedLog::open_group(
                    &config.data_dir,
                    vec![
                        ("topics".into(), config.log.clone()),
                        ("internal".into(), internal_config(&config)),
                    ],
                )
                .await?;
                let internal = logs.pop().expect("two logs opened");
                let data = logs.pop().expect("two logs opened");
                let place = Place {
                    shard: 0,
                    sessions: sessions.clone(),
                    sagas: true,
                    claims: None,
                };
                let broker = open_broker(
                    &config,
                    StoreLog::Embedded(data.clone()),
                    StoreLog::Embedded(internal.clone()),
                    place,
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
        Ok(Coordinator {
            config,
            embedded,
            sessions,
            metrics: None,
            tls,
        })
    }

    /// `fdatasync` calls of the embedded store's data folder so far, read
    /// while it serves (for benchmarks); `None` on PostgreSQL.
    pub fn sync_counter(&self) -> Option<tandem_storage::SyncCounter> {
        self.embedded.as_ref().map(|e| e.data.sync_counter())
    }

    /// Serves Prometheus metrics (`GET /metrics`) on `listener` while it
    /// serves.
    pub fn with_metrics(mut self, listener: TcpListener) -> Coordinator {
        self.metrics = Some(listener);
        self
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
        let advertise = match self.config.store {
            Store::Embedded => None,
            Store::Postgres { .. } => Some(match &self.config.replication.advertise {
                Some(a) => a.clone(),
                // Other replicas forward to it and sidecars open sessions
                // with it: it must say where it is.
                None if local.ip().is_unspecified() => {
                    return Err(Error::FailedPrecondition(format!(
                        "advertise: this replica listens on {local}, which names no machine; with a PostgreSQL store give --advertise HOST:PORT (the address the other replicas and sidecars reach it at)"
                    )));
                }
                None => local.to_string(),
            }),
        };
        let count = shard_count(&self.config);
        let (roles, roles_rx) = watch::channel(vec![Role::Standby { owner: None }; count as usize]);
        let (replicas, replicas_rx) = watch::channel(Vec::new());
        let (stopping, stopping_rx) = watch::channel(false);
        let stopping = Arc::new(stopping);
        let cluster = Arc::new(
            Cluster::new(
                roles_rx,
                count,
                self.sessions.clone(),
                replicas_rx,
                stopping_rx,
                self.config.replication.lease,
                advertise.clone(),
            )
            .with_peer_tls(self.tls.as_ref().map(|(_, c)| c.clone())),
        );
        let service = CoordinatorServer::new(
            CoordinatorService::with_cluster(
                cluster.clone(),
                self.config.max_message_bytes,
                self.config.session_timeout,
            )
            .with_authorization(
                self.tls.as_ref().map(|(s, _)| s.identity()),
                self.config.authorization.clone(),
            ),
        )
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_REQUEST_BYTES);
        let mut builder = Server::builder();
        if self.tls.is_some() {
            // A certificate that expires or a CA taken out of the bundle
            // stops counting within the hour on live connections too.
            // (Streams that outlive the graceful close are cut a minute on.)
            builder = builder
                .max_connection_age(std::time::Duration::from_secs(3600))
                .max_connection_age_grace(std::time::Duration::from_secs(60));
        }
        let router = tandem_proto::with_reflection(
            builder.add_service(health_service).add_service(service),
            &[tandem_proto::coordinator::coordinator_server::SERVICE_NAME],
        )
        .map_err(|e| Error::Serve(format!("gRPC reflection: {e}")))?;
        let sync_times = self.embedded.as_ref().map(|e| e.data.sync_times());
        let metrics = self.metrics.map(|listener| {
            let cluster = cluster.clone();
            tokio::spawn(tandem_runtime::metrics::serve(listener, move || {
                let (cluster, sync_times) = (cluster.clone(), sync_times.clone());
                async move { crate::metrics::render(&cluster, sync_times.as_ref()).await }
            }))
        });
        let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
        let stopped = async {
            let _ = server_stopped.await;
        };
        let server = match &self.tls {
            Some((tls, _)) => {
                tokio::spawn(router.serve_with_incoming_shutdown(tls.incoming(listener), stopped))
            }
            None => {
                let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
            }
        };
        let ended = match self.embedded {
            Some(e) => serve_embedded(&self.config, e, &roles, &health, shutdown).await,
            None => {
                let Store::Postgres { url } = &self.config.store else {
                    unreachable!("only the embedded store is opened before serving");
                };
                let Some(advertise) = advertise.clone() else {
                    unreachable!("a replica on PostgreSQL has an address");
                };
                // (The last digits of a v7 UUID are random.)
                let suffix = uuid::Uuid::now_v7().simple().to_string();
                let me = format!(
                    "{}#{}",
                    self.config.replication.replica_id,
                    &suffix[suffix.len() - 8..]
                );
                let replica = Replica {
                    me,
                    stopping: stopping.clone(),
                    config: self.config.clone(),
                    url: url.clone(),
                    advertise,
                    roles: Arc::new(roles),
                    health: health.clone(),
                    replicas,
                    cluster,
                    sessions: self.sessions.clone(),
                };
                replica.run(shutdown).await
            }
        };
        stopping.send_replace(true);
        if let Some(m) = metrics {
            m.abort();
        }
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
    roles: &watch::Sender<Vec<Role<StoreLog>>>,
    health: &HealthReporter,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let retention =
        StoreLog::Embedded(e.data.clone()).spawn_retention(config.retention_schedule.clone());
    roles.send_replace(vec![Role::Active(e.broker.clone(), None)]);
    health.set_serving::<Service>().await;
    let (mut a, mut b, mut c) = (
        e.data.failed(),
        e.internal.failed(),
        sagas_failed(&e.broker),
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

/// Failures of a broker's saga driver (none for a shard without sagas).
pub(crate) fn sagas_failed(broker: &Broker<StoreLog>) -> watch::Receiver<Option<String>> {
    match &broker.sagas {
        Some(s) => s.failed(),
        None => watch::channel(None).1,
    }
}

/// Sets the server's overall health (service "") to whether the replica
/// reaches its database.
pub(crate) async fn reaches_store(health: &HealthReporter, yes: bool) {
    let status = if yes {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
}

/// Resolves with the cause of the first failure a log or the saga driver
/// reports.
pub(crate) async fn first_failure(
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
    let metrics = tandem_runtime::metrics::bind(config.metrics_listen)
        .await
        .map_err(|(addr, source)| Error::Bind { addr, source })?;
    let mut coordinator = Coordinator::open(config).await?;
    println!("tandem-coordinator listening on {addr}");
    if let Some((listener, at)) = metrics {
        println!("tandem-coordinator metrics on http://{at}/metrics");
        coordinator = coordinator.with_metrics(listener);
    }
    tracing::info!(%addr, "listening");
    coordinator.serve(listener, shutdown).await
}
