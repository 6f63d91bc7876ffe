//! What one replica knows of the others, for routing requests: which
//! shards it serves now (a [`Role`] per shard), who serves the rest, the
//! live replicas (for sidecars, which hold a session with each), and
//! clients to forward requests to their shard's owner.
//!
//! A unary request for a shard this replica does not serve is forwarded to
//! the shard's owner, marked with [`FORWARDED_METADATA`]; a forwarded
//! request is never forwarded again (the owner answers it or refuses it as
//! UNAVAILABLE naming whom it believes the owner is, so a client retries
//! there). Streams (Consume) are not forwarded: they are refused naming the
//! owner, and the client opens them there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tandem_runtime::tls::ClientTls;
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::broker::Broker;
use crate::claims::Claims;
use crate::service::{OWNER_METADATA, Role};
use crate::session::Sessions;

/// Metadata marking a request forwarded by another replica.
pub(crate) const FORWARDED_METADATA: &str = "tandem-forwarded";

/// Clients of other replicas kept at most.
const MAX_PEERS: usize = 64;

/// Where a request is served.
pub(crate) enum Target<L> {
    /// By this replica.
    Here(Arc<Broker<L>>),
    /// By the owner at this address.
    There(String),
}

/// A replica's view of the shards.
pub(crate) struct Cluster<L> {
    roles: watch::Receiver<Vec<Role<L>>>,
    count: u32,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) claims: Arc<OnceLock<Arc<Claims>>>,
    pub(crate) replicas: watch::Receiver<Vec<String>>,
    pub(crate) stopping: watch::Receiver<bool>,
    peers: Mutex<HashMap<String, CoordinatorClient<Channel>>>,
    /// How long a request about a shard nobody owns (it is moving, or its
    /// owner died) waits for an owner before it is refused.
    wait: Duration,
    /// This replica's advertised address (none for a single coordinator).
    pub(crate) advertise: Option<String>,
    /// Mutual TLS to the other replicas (`None`: plaintext).
    peer_tls: Option<Arc<ClientTls>>,
}

impl<L> Cluster<L> {
    /// A view over `count` shards whose roles `roles` holds.
    pub(crate) fn new(
        roles: watch::Receiver<Vec<Role<L>>>,
        count: u32,
        sessions: Arc<Sessions>,
        replicas: watch::Receiver<Vec<String>>,
        stopping: watch::Receiver<bool>,
        wait: Duration,
        advertise: Option<String>,
    ) -> Cluster<L> {
        Cluster {
            roles,
            count,
            sessions,
            claims: Arc::default(),
            replicas,
            stopping,
            peers: Mutex::default(),
            wait,
            advertise,
            peer_tls: None,
        }
    }

    /// Reaches the other replicas over mutual TLS with `tls`.
    pub(crate) fn with_peer_tls(mut self, tls: Option<Arc<ClientTls>>) -> Cluster<L> {
        self.peer_tls = tls;
        self
    }

    /// Shards in all.
    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    /// The brokers of the shards served here now.
    pub(crate) fn local(&self) -> Vec<(u32, Arc<Broker<L>>)> {
        self.roles
            .borrow()
            .iter()
            .enumerate()
            .filter_map(|(k, r)| match r {
                Role::Active(b, v) if v.as_ref().is_none_or(|v| v.valid()) => {
                    Some((k as u32, b.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// Where shard `k`'s requests go; a forwarded request is only served
    /// here.
    pub(crate) fn target(&self, k: u32, forwarded: bool) -> Result<Target<L>, Status> {
        let roles = self.roles.borrow();
        let Some(role) = roles.get(k as usize) else {
            return Err(Status::internal(format!("no shard {k}")));
        };
        match role {
            Role::Active(_, Some(v)) if !v.valid() => Err(Status::unavailable(format!(
                "this coordinator replica's lease on shard {k} ran out before it could renew it"
            ))),
            Role::Active(b, _) => Ok(Target::Here(b.clone())),
            Role::Standby { owner: Some(o) } if !forwarded => Ok(Target::There(o.clone())),
            Role::Standby { owner } => Err(not_serving(k, self.count, owner.as_deref())),
        }
    }

    /// Whether nobody serves shard `k` now, as far as this replica knows.
    fn unowned(&self, k: u32) -> bool {
        matches!(
            self.roles.borrow().get(k as usize),
            Some(Role::Standby { owner: None })
        )
    }

    /// Waits (up to the wait) until `unowned` is false for every shard
    /// `which` names.
    async fn owned(&self, which: impl Fn(u32) -> bool) {
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut roles = self.roles.clone();
        while !*self.stopping.borrow() && (0..self.count).any(|k| which(k) && self.unowned(k)) {
            if tokio::time::timeout_at(deadline, roles.changed())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// [`target`](Self::target), waiting a while for an owner when the
    /// shard has none (it is moving).
    pub(crate) async fn target_waiting(
        &self,
        k: u32,
        forwarded: bool,
    ) -> Result<Target<L>, Status> {
        self.owned(|j| j == k).await;
        self.target(k, forwarded)
    }

    /// Shard `k` served here, or its refusal naming the owner (streams).
    pub(crate) async fn here(&self, k: u32) -> Result<Arc<Broker<L>>, Status> {
        match self.target_waiting(k, true).await? {
            Target::Here(b) => Ok(b),
            Target::There(_) => unreachable!("a forwarded request is only served here"),
        }
    }

    /// Owners of the shards not served here (each address once), or the
    /// refusal of a shard nobody serves now.
    pub(crate) async fn others(&self) -> Result<Vec<String>, Status> {
        self.owned(|_| true).await;
        let roles = self.roles.borrow();
        let mut owners: Vec<String> = Vec::new();
        for (k, r) in roles.iter().enumerate() {
            match r {
                Role::Active(..) => {}
                Role::Standby { owner: Some(o) } => {
                    if !owners.contains(o) {
                        owners.push(o.clone());
                    }
                }
                Role::Standby { owner: None } => {
                    return Err(not_serving(k as u32, self.count, None));
                }
            }
        }
        Ok(owners)
    }

    /// A client of the replica at `address`.
    pub(crate) fn peer(&self, address: &str) -> Result<CoordinatorClient<Channel>, Status> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = peers.get(address) {
            return Ok(c.clone());
        }
        let scheme = tandem_runtime::tls::scheme(self.peer_tls.is_some());
        let endpoint = tandem_runtime::tls::endpoint(&format!("{scheme}://{address}"))
            .map_err(|e| Status::internal(format!("replica address {address:?}: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(3));
        if peers.len() >= MAX_PEERS {
            // Replicas come and go with new addresses (pods): the old
            // ones' clients are dropped rather than kept for ever.
            peers.clear();
        }
        let max = crate::MAX_REQUEST_BYTES;
        let channel = tandem_runtime::tls::lazy_channel(endpoint, self.peer_tls.as_ref());
        let client = CoordinatorClient::new(channel)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        peers.insert(address.to_owned(), client.clone());
        Ok(client)
    }
}

/// `req` marked as forwarded.
pub(crate) fn forwarded<T>(req: T) -> Request<T> {
    let mut r = Request::new(req);
    r.metadata_mut().insert(
        FORWARDED_METADATA,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    r
}

/// Whether `req` was forwarded by another replica.
pub(crate) fn was_forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED_METADATA)
}

/// The refusal of a replica that does not serve shard `k`.
pub(crate) fn not_serving(k: u32, count: u32, owner: Option<&str>) -> Status {
    let what = if count <= 1 {
        "does not hold the lease".to_owned()
    } else {
        format!("does not own shard {k} of {count}")
    };
    let mut status = Status::unavailable(match owner {
        Some(o) => format!("this coordinator replica {what}; {o} does"),
        None => format!("this coordinator replica {what} (no owner known yet)"),
    });
    if let Some(v) = owner.and_then(|o| o.parse().ok()) {
        status.metadata_mut().insert(OWNER_METADATA, v);
    }
    status
}
