//! Replicas of the coordinator on one PostgreSQL database. Its topics are
//! divided into `shards` (see `shards.rs`), each with its own lease row and
//! logs. Every replica heartbeats a lease of its own (`replica/<id>`), so
//! all know which replicas are live, and balances the shards: it takes free
//! ones (never held, released, or expired) while it holds fewer than an
//! even share, and gives one back at a time while it holds more than its
//! share and another live replica holds less (and only while every shard
//! has an owner); a shard nobody took for a lease's length is taken past
//! the share. Lease rows name the replica's id with a suffix of its
//! process, so that two processes given one id never mistake each other's
//! shards for their own. For each shard it holds, it
//! opens the shard's logs under the lease (recovering the state the
//! previous owner left: open transactions are checked back, consumers
//! resume from committed offsets) and serves it while it keeps renewing the
//! lease; after losing it, failing to renew it in time, or a failed write,
//! it drops the shard and leaves it to others for a lease's length. A
//! request about a shard served elsewhere is forwarded to its owner (see
//! `cluster.rs`). The coordinator service's health is SERVING while the
//! replica serves at least one shard; the server's overall health (service
//! name "") says whether the replica reaches the database, which is what
//! readiness should check: a replica that does is useful (it forwards
//! requests and is ready to take shards over), and marking it unready would
//! leave a disruption budget nothing to allow. Each lease's epoch fences
//! every write to its shard: a replica that was paused past its lease
//! cannot write a row after its successor took over.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tandem_storage::{PgStore, StoreLog};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic_health::server::HealthReporter;

use crate::broker::Place;
use crate::claims::Claims;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::server::{
    LEASE_NAME, Service, first_failure, internal_config, open_broker, reaches_store, sagas_failed,
};
use crate::service::{Role, Validity};
use crate::session::Sessions;
use crate::shards::{lease_name, namespaces, shard_of};

/// Prefix of the lease each live replica heartbeats.
const REPLICA_LEASE: &str = "replica/";

/// One replica on a PostgreSQL store.
pub(crate) struct Replica {
    /// The owner it writes into lease rows: its id and this process's own
    /// suffix, so that two processes given one id never take each other's
    /// leases for their own (a restarted replica waits for its old leases
    /// to expire like anyone else).
    pub(crate) me: String,
    /// Set once it shuts down: requests are refused at once instead of
    /// waiting for shards to find an owner.
    pub(crate) stopping: Arc<watch::Sender<bool>>,
    pub(crate) config: Config,
    pub(crate) url: String,
    pub(crate) advertise: String,
    pub(crate) roles: Arc<watch::Sender<Vec<Role<StoreLog>>>>,
    pub(crate) health: HealthReporter,
    pub(crate) replicas: watch::Sender<Vec<String>>,
    pub(crate) cluster: Arc<Cluster<StoreLog>>,
    pub(crate) sessions: Arc<Sessions>,
}

/// Why a replica stopped serving a shard.
enum Ended {
    /// Asked to (shutdown, or giving the shard to another replica).
    Stopped,
    Lost(String),
    Failed(Error),
}

/// A shard being served by this replica.
struct Host {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Longest pause between two attempts to reach the database.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Replica {
    pub(crate) async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let count = self.config.replication.shards;
        let id = self.config.replication.replica_id.clone();
        tracing::info!(replica = %id, advertise = %self.advertise, shards = count, "replica on PostgreSQL starting");
        let mut backoff = Duration::from_millis(100);
        // Connections: the lease work, and two logs per shard it may serve.
        let pool = 6 + 2 * count.min(29);
        let (store, leases) = loop {
            let attempt = async {
                let store =
                    PgStore::connect_sized(&self.url, self.config.replication.lease, pool).await?;
                // Leases on connections of their own: renewals never wait
                // behind appends and long reads.
                let leases =
                    PgStore::connect_sized(&self.url, self.config.replication.lease, 3).await?;
                // A store written before it had shards is one shard: its
                // logs are `topics` and `internal`.
                let proposed = if store.has_log("internal").await? {
                    1
                } else {
                    count
                };
                let stored = store.fixed_setting("shards", &proposed.to_string()).await?;
                Ok::<_, Error>((store, leases, stored))
            };
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                r = attempt => match r {
                    Ok((store, leases, stored)) => {
                        if stored != count.to_string() {
                            store.close().await;
                            leases.close().await;
                            return Err(Error::FailedPrecondition(format!(
                                "shards: this store was set up with {stored} shards and this replica is configured with {count}; every replica of a store needs the same number"
                            )));
                        }
                        break (store, leases);
                    }
                    Err(e) => {
                        reaches_store(&self.health, false).await;
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot reach PostgreSQL");
                        tokio::select! {
                            () = &mut shutdown => return Ok(()),
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                },
            }
        };
        if count > 1 {
            let _ = self.cluster.claims.set(Claims::start(store.clone()));
        }
        let lease = self.config.replication.lease;
        let tick = (lease / 4).max(Duration::from_millis(20));
        let (ended_tx, mut ended_rx) = tokio::sync::mpsc::unbounded_channel::<(u32, Ended)>();
        let mut hosts: HashMap<u32, Host> = HashMap::new();
        let mut resting: HashMap<u32, Instant> = HashMap::new();
        let mut free_since: HashMap<u32, Instant> = HashMap::new();
        let mut seen: HashMap<String, Instant> = HashMap::new();
        let mut rounds: u64 = 0;
        loop {
            self.balance(
                (&store, &leases),
                &mut hosts,
                &mut resting,
                &mut free_since,
                &mut seen,
                &ended_tx,
            )
            .await;
            rounds += 1;
            if rounds.is_multiple_of(200) {
                // Replicas that left long ago (each process start with a
                // generated id adds one).
                if let Err(e) = leases
                    .forget_leases(REPLICA_LEASE, Duration::from_secs(3600))
                    .await
                {
                    tracing::debug!(error = %e, "could not forget old replica leases");
                }
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(tick) => {}
                Some((k, ended)) = ended_rx.recv() => {
                    hosts.remove(&k);
                    match ended {
                        Ended::Stopped => tracing::info!(shard = k, "shard handed back"),
                        Ended::Lost(cause) => {
                            tracing::error!(shard = k, %cause, "stopped serving the shard");
                            // Let a healthy replica have it first: this one
                            // may be why it was lost (writes failing here).
                            resting.insert(k, Instant::now() + lease);
                        }
                        Ended::Failed(e) => {
                            tracing::error!(shard = k, error = %e, "could not open the shard's logs");
                            resting.insert(k, Instant::now() + lease);
                        }
                    }
                    if hosts.is_empty() {
                        self.health.set_not_serving::<Service>().await;
                    }
                }
            }
        }
        tracing::info!("shutting down");
        self.stopping.send_replace(true);
        self.health.set_not_serving::<Service>().await;
        for h in hosts.values() {
            h.stop.send_replace(true);
        }
        for (_, h) in hosts {
            let _ = h.task.await;
        }
        if let Ok(Some(l)) = leases.holder(&format!("{REPLICA_LEASE}{id}")).await
            && l.owner == self.me
        {
            let _ = leases.release(&l).await;
        }
        store.close().await;
        leases.close().await;
        Ok(())
    }

    /// One round: heartbeats this replica, learns who holds what, tells
    /// clients, then takes free shards or gives one back to even the load.
    async fn balance(
        &self,
        (store, leases): (&PgStore, &PgStore),
        hosts: &mut HashMap<u32, Host>,
        resting: &mut HashMap<u32, Instant>,
        free_since: &mut HashMap<u32, Instant>,
        seen: &mut HashMap<String, Instant>,
        ended: &tokio::sync::mpsc::UnboundedSender<(u32, Ended)>,
    ) {
        let r = &self.config.replication;
        let count = r.shards;
        let me = &self.me;
        let looked = async {
            let name = format!("{REPLICA_LEASE}{}", r.replica_id);
            if leases
                .acquire(&name, me, &self.advertise, r.lease)
                .await?
                .is_none()
            {
                tracing::warn!(replica = %me, "another live process uses this replica_id: give each replica its own");
            }
            let live = leases.live_leases(REPLICA_LEASE).await?;
            let held = leases.live_leases(LEASE_NAME).await?;
            Ok::<_, Error>((live, held))
        };
        let (live, held) = match looked.await {
            Ok(v) => v,
            Err(e) => {
                reaches_store(&self.health, false).await;
                tracing::warn!(error = %e, "cannot reach PostgreSQL to balance the shards");
                return;
            }
        };
        reaches_store(&self.health, true).await;
        let addresses: Vec<String> = live.iter().map(|l| l.address.clone()).collect();
        self.replicas.send_if_modified(|v| {
            let changed = *v != addresses;
            if changed {
                v.clone_from(&addresses);
            }
            changed
        });
        // Holders by shard; shards held per live replica.
        let mut holder: HashMap<u32, tandem_storage::Lease> = HashMap::new();
        for l in held {
            if let Some(k) = (0..count).find(|k| lease_name(*k, count) == l.name) {
                holder.insert(k, l);
            }
        }
        let mut load: HashMap<&str, u32> = live.iter().map(|l| (l.owner.as_str(), 0)).collect();
        for l in holder.values() {
            if let Some(n) = load.get_mut(l.owner.as_str()) {
                *n += 1;
            }
        }
        // What clients are told about shards served elsewhere.
        self.roles.send_if_modified(|roles| {
            let mut changed = false;
            for (k, role) in roles.iter_mut().enumerate() {
                if matches!(role, Role::Active(..)) {
                    continue;
                }
                let owner = holder
                    .get(&(k as u32))
                    .filter(|h| h.owner != *me)
                    .map(|h| h.address.clone());
                if !matches!(role, Role::Standby { owner: o } if *o == owner) {
                    *role = Role::Standby { owner };
                    changed = true;
                }
            }
            changed
        });
        let now = Instant::now();
        // Shards are handed only to replicas live for two leases: one that
        // just came back (restarted, or woken from a pause that cost it
        // its shards) is not given shards that moved away from it moments
        // ago, at the cost of a second move in a row.
        seen.retain(|owner, _| load.contains_key(owner.as_str()));
        for owner in load.keys() {
            seen.entry((*owner).to_owned()).or_insert(now);
        }
        let settled = |owner: &str| {
            owner == me.as_str()
                || seen
                    .get(owner)
                    .is_some_and(|t| now.duration_since(*t) >= 2 * r.lease)
        };
        let share = |replicas: usize| {
            let replicas = replicas.max(1) as u32;
            let floor = count / replicas;
            (floor, floor + u32::from(!count.is_multiple_of(replicas)))
        };
        // Taking free shards counts every live replica; giving shards back
        // only the settled ones.
        let (floor, cap) = share(live.len());
        let settled_live: Vec<&str> = load.keys().copied().filter(|o| settled(o)).collect();
        let (settled_floor, settled_cap) = share(settled_live.len());
        let mine = hosts.len() as u32;
        let starved = load.values().any(|n| *n < floor);
        let settled_starved = settled_live
            .iter()
            .any(|o| load.get(o).is_some_and(|n| *n < settled_floor));
        free_since.retain(|k, _| !holder.contains_key(k) && !hosts.contains_key(k));
        for k in 0..count {
            if !holder.contains_key(&k) && !hosts.contains_key(&k) {
                free_since.entry(k).or_insert(now);
            }
        }
        // Given back only while every shard has an owner: a free one goes
        // to a replica below its share first.
        if free_since.is_empty()
            && (mine > settled_cap || (mine > settled_floor && settled_starved))
        {
            // Give one back, the highest, unless one is being given back.
            if let Some(k) = hosts.keys().copied().max()
                && let Some(h) = hosts.get(&k)
                && !*h.stop.borrow()
            {
                tracing::info!(
                    shard = k,
                    held = mine,
                    share = settled_cap,
                    "handing a shard back to even the load"
                );
                h.stop.send_replace(true);
            }
            return;
        }
        resting.retain(|_, until| *until > now);
        // A replica at its floor leaves free shards to starved ones for a
        // lease's length (they may be about to take them); after that any
        // replica below the cap takes them, so none stays unowned.
        let patient = starved && mine >= floor;
        // Free shards, looked at from a place of this replica's own so
        // that replicas starting together do not all race for the same.
        let start = shard_of(&r.replica_id, count);
        let mut taking = mine;
        for i in 0..count {
            let k = (start + i) % count;
            if hosts.contains_key(&k) || holder.contains_key(&k) || resting.contains_key(&k) {
                continue;
            }
            // Past the share only for a shard nobody took for a lease's
            // length (its replicas at their cap, or failing to open it).
            let abandoned = free_since
                .get(&k)
                .is_some_and(|t| now.duration_since(*t) >= r.lease);
            if taking >= cap && !abandoned {
                continue;
            }
            if patient
                && free_since
                    .get(&k)
                    .is_some_and(|t| now.duration_since(*t) < r.lease)
            {
                continue;
            }
            let before = Instant::now();
            match leases
                .acquire(&lease_name(k, count), me, &self.advertise, r.lease)
                .await
            {
                Ok(Some(lease)) => {
                    let stores = (store.clone(), leases.clone());
                    hosts.insert(k, self.host(stores, k, lease, before, ended.clone()));
                    taking += 1;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(shard = k, error = %e, "could not take a shard's lease");
                    return;
                }
            }
        }
    }

    /// Starts serving shard `k` under `lease` (taken at `taken_at`).
    fn host(
        &self,
        (store, leases): (PgStore, PgStore),
        k: u32,
        lease: tandem_storage::Lease,
        taken_at: Instant,
        ended: tokio::sync::mpsc::UnboundedSender<(u32, Ended)>,
    ) -> Host {
        let (stop, stop_rx) = watch::channel(false);
        let shard = Shard {
            config: self.config.clone(),
            store,
            leases,
            k,
            lease,
            roles: self.roles.clone(),
            sessions: self.sessions.clone(),
            claims: self.cluster.claims.get().cloned(),
            health: self.health.clone(),
        };
        let task = tokio::spawn(async move {
            let end = shard.serve(taken_at, stop_rx).await;
            // Free at once for whoever takes it next (after a loss this
            // replica rests from it meanwhile).
            if let Err(e) = shard.leases.release(&shard.lease).await {
                tracing::warn!(shard = k, error = %e, "could not release the shard's lease; it expires on its own");
            }
            let _ = ended.send((k, end));
        });
        Host { stop, task }
    }
}

/// One shard served by this replica.
struct Shard {
    config: Config,
    /// For its logs.
    store: PgStore,
    /// For its lease.
    leases: PgStore,
    k: u32,
    lease: tandem_storage::Lease,
    roles: Arc<watch::Sender<Vec<Role<StoreLog>>>>,
    sessions: Arc<Sessions>,
    claims: Option<Arc<Claims>>,
    health: HealthReporter,
}

impl Shard {
    fn set_role(&self, role: Role<StoreLog>) {
        self.roles.send_modify(|r| r[self.k as usize] = role);
    }

    /// Opens the shard's logs under its lease and serves it until told to
    /// stop, the loss of the lease, or a failed write. The lease is renewed
    /// from the start, recovery included.
    async fn serve(&self, taken_at: Instant, mut stop: watch::Receiver<bool>) -> Ended {
        let started = Instant::now();
        let c = &self.config;
        let (k, count) = (self.k, c.replication.shards);
        let lease = &self.lease;
        let ttl = c.replication.lease;
        let validity = Arc::new(Validity::new(taken_at + margin(ttl)));
        // A task of its own, so that recovery runs to its end (a recovery
        // dropped half way would leave its tasks behind) while the lease is
        // renewed; a loss meanwhile shows once it is done.
        let mut keeper = tokio::spawn({
            let (store, lease, validity) = (self.leases.clone(), lease.clone(), validity.clone());
            async move { keep(&store, &lease, ttl, &validity).await }
        });
        let (topics_ns, internal_ns) = namespaces(k, count);
        let place = Place {
            shard: k,
            sessions: self.sessions.clone(),
            sagas: shard_of(crate::saga::SAGA_TOPIC, count) == k,
            claims: self.claims.clone(),
        };
        // Opened to the end even when told to stop meanwhile: a recovery
        // dropped half way would leave its tasks behind.
        let data = match self.store.open(&topics_ns, lease, c.log.clone()).await {
            Ok(d) => d,
            Err(e) => {
                keeper.abort();
                return Ended::Failed(e.into());
            }
        };
        let internal = match self
            .store
            .open(&internal_ns, lease, internal_config(c))
            .await
        {
            Ok(i) => i,
            Err(e) => {
                data.close().await;
                keeper.abort();
                return Ended::Failed(e.into());
            }
        };
        let broker = match open_broker(
            c,
            StoreLog::Postgres(data.clone()),
            StoreLog::Postgres(internal.clone()),
            place,
        )
        .await
        {
            Ok(b) => b,
            Err(e) => {
                data.close().await;
                internal.close().await;
                keeper.abort();
                return Ended::Failed(e);
            }
        };
        if *stop.borrow() {
            broker.shutdown().await;
            data.close().await;
            internal.close().await;
            keeper.abort();
            return Ended::Stopped;
        }
        let retention =
            StoreLog::Postgres(data.clone()).spawn_retention(c.retention_schedule.clone());
        self.set_role(Role::Active(broker.clone(), Some(validity.clone())));
        self.health.set_serving::<Service>().await;
        tracing::info!(
            shard = k,
            epoch = lease.epoch,
            recovery_ms = started.elapsed().as_millis() as u64,
            "holding the lease: serving"
        );
        let (mut a, mut b, mut f) = (data.failed(), internal.failed(), sagas_failed(&broker));
        let ended = tokio::select! {
            _ = stop.wait_for(|s| *s) => Ended::Stopped,
            cause = first_failure(&mut a, &mut b, &mut f) => Ended::Lost(format!("a write failed: {cause}")),
            cause = &mut keeper => Ended::Lost(cause.unwrap_or_else(|e| format!("the lease keeper failed: {e}"))),
        };
        self.set_role(Role::Standby { owner: None });
        retention.abort();
        // Ends consumer sessions and lets in-flight steps finish, still
        // renewing the lease when the shard is handed back (so that what
        // was acknowledged meanwhile is written under it); after a loss
        // their writes are refused, which is what they must be.
        broker.shutdown().await;
        data.close().await;
        internal.close().await;
        keeper.abort();
        ended
    }
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
